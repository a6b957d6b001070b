//! The command line: clap definitions, and `Setup` (one environment's playbook, hosts, connector
//! and output style), which each command module builds from the flags it is handed; `ferry exec`
//! and the `ferry check` table. Exit codes: 0 success, 1 a deploy or host failed, 2 usage or
//! configuration error (bad flags, bad playbook, no key), 130 after a second Ctrl-C.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::sync::Semaphore;

use crate::ci::DeployContext;
use crate::inventory::{self, Host, Overrides, RunSettings};
use crate::known_hosts::KnownHosts;
use crate::playbook::{self, KnownHostsSource, Playbook};
use crate::report::{self, Style};
use crate::ssh::{Connector, Stream};
use crate::{check, deploy, fleet, keys};

/// An error that is the user's to fix before anything runs (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Ship build output and containers to your own servers over SSH, from GitLab CI.",
    after_help = "Examples:
  ferry check playbooks/frontend-dist.yml --env production
  ferry deploy playbooks/release-deploy.yml            # environment chosen by the ref's rule
  ferry deploy playbooks/frontend-dist.yml --env production --plan
  ferry rollback playbooks/frontend-dist.yml --env production
  ferry status playbooks/release-deploy.yml --json
  ferry exec playbooks/release-deploy.yml --env staging -- df -h /srv

Secrets come from the environment: SSH_PRIVATE_KEY (text or base64), SSH_PRIVATE_KEY_PASSPHRASE,
SSH_KNOWN_HOSTS. See keys.example."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: Global,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Private key file (instead of SSH_PRIVATE_KEY or ssh-agent)
    #[arg(long, short = 'i', global = true, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// known_hosts file (instead of SSH_KNOWN_HOSTS or ~/.ssh/known_hosts)
    #[arg(long, global = true, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Trust and record host keys of hosts not yet in known_hosts (mismatches still fail)
    #[arg(long, global = true)]
    pub accept_new: bool,
    /// Hosts to work on at once
    #[arg(long, global = true, value_name = "N")]
    pub forks: Option<usize>,
    /// Give up on a host that does not answer within this time (e.g. 10s)
    #[arg(long, global = true, value_name = "DURATION", value_parser = playbook::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Only these hosts (by name or address; repeatable)
    #[arg(long, global = true, value_name = "HOST")]
    pub limit: Vec<String>,
    /// Print results as JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging on stderr (-v, -vv)
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The playbook file
    #[arg(default_value = "ferry.yml", env = "FERRY_PLAYBOOK")]
    pub playbook: PathBuf,
    /// The environment (deploy, sync, stop: chosen by the ref's rule if not given; check, status,
    /// history: all if not given; rollback, exec, unlock, lock status: required)
    #[arg(long, short = 'e')]
    pub env: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RefArgs {
    /// The ref being deployed (default: CI_COMMIT_TAG / CI_COMMIT_REF_NAME, then git)
    #[arg(long = "ref", value_name = "REF")]
    pub ref_name: Option<String>,
    /// With --ref: the ref is a tag
    #[arg(long, requires = "ref_name")]
    pub tag: bool,
    /// The commit (default: CI_COMMIT_SHA, then git)
    #[arg(long)]
    pub sha: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Connect to every host and show what ferry would work with
    #[command(
        after_help = "Example:\n  SSH_PRIVATE_KEY=\"$(cat ~/.ssh/deploy)\" ferry check ferry.yml --env staging"
    )]
    Check {
        #[command(flatten)]
        target: Target,
    },
    /// Run an ad-hoc command on the hosts
    #[command(after_help = "Example:\n  ferry exec ferry.yml --env staging -- docker ps")]
    Exec {
        #[command(flatten)]
        target: Target,
        /// Give up after this long
        #[arg(long, value_parser = playbook::parse_duration)]
        timeout: Option<Duration>,
        /// The command and its arguments, passed through exactly
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
    /// Run the environment's steps (sync, containers, ...)
    #[command(
        after_help = "Examples:\n  ferry deploy ferry.yml                 # in CI: env from the ref's rule\n  ferry deploy ferry.yml --env staging --plan"
    )]
    Deploy {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        refs: RefArgs,
        #[command(flatten)]
        opts: DeployOpts,
    },
    /// Run only the sync steps of the environment
    #[command(
        after_help = "Example:\n  ferry sync playbooks/frontend-dist.yml --env production --plan"
    )]
    Sync {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        refs: RefArgs,
        #[command(flatten)]
        opts: DeployOpts,
    },
    /// Switch files and containers back to the previous (or a named) release
    #[command(
        after_help = "Examples:\n  ferry rollback ferry.yml --env production\n  ferry rollback ferry.yml --env production --to 20261122T101500.250Z-1a2b3c4d"
    )]
    Rollback {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        refs: RefArgs,
        /// The release to go back to (default: the one before the live one)
        #[arg(long, value_name = "RELEASE")]
        to: Option<String>,
        #[command(flatten)]
        opts: DeployOpts,
    },
    /// Remove a branch's deployment (GitLab's on_stop)
    #[command(after_help = "Example:\n  ferry stop ferry.yml --env review --ref feature/login")]
    Stop {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        refs: RefArgs,
        #[command(flatten)]
        opts: DeployOpts,
    },
    /// What is live where, per branch
    #[command(
        after_help = "Examples:\n  ferry status ferry.yml\n  ferry status ferry.yml --env staging --ref release-1.4 --json"
    )]
    Status {
        #[command(flatten)]
        target: Target,
        /// Only this ref
        #[arg(long = "ref", value_name = "REF")]
        ref_name: Option<String>,
    },
    /// Recent deploys from the hosts' ledgers
    #[command(
        after_help = "Examples:\n  ferry history ferry.yml --env staging\n  ferry history ferry.yml --ref release-1.4 -n 50 --json"
    )]
    History {
        #[command(flatten)]
        target: Target,
        /// Only this ref
        #[arg(long = "ref", value_name = "REF")]
        ref_name: Option<String>,
        /// How many entries
        #[arg(long = "entries", short = 'n', value_name = "N", default_value_t = 20)]
        limit_entries: usize,
    },
    /// Inspect deploy locks
    #[command(after_help = "Example:\n  ferry lock status ferry.yml --env staging")]
    Lock {
        #[command(subcommand)]
        command: LockCommand,
    },
    /// Remove a deploy lock left by a killed run
    #[command(after_help = "Example:\n  ferry unlock ferry.yml --env staging")]
    Unlock {
        #[command(flatten)]
        target: Target,
        /// Remove it even though its lease is still being renewed (the run may be alive)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum LockCommand {
    /// Show who holds the lock on each host
    #[command(after_help = "Example:\n  ferry lock status ferry.yml --env staging")]
    Status {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug, Clone, Default)]
pub struct DeployOpts {
    /// Show what would change on each host; change nothing
    #[arg(long, alias = "dry-run")]
    pub plan: bool,
    /// If another deploy holds the lock, wait this long for it (e.g. 5m)
    #[arg(long, value_name = "DURATION", value_parser = playbook::parse_duration)]
    pub lock_wait: Option<Duration>,
}

/// Everything a command needs: playbook, hosts, SSH connector, output style.
pub struct Setup {
    pub playbook: Playbook,
    pub env: String,
    pub hosts: Vec<Host>,
    pub settings: RunSettings,
    pub connector: Connector,
    pub style: Style,
}

impl Setup {
    /// Load the playbook and resolve `env` against the deploy context's variables.
    pub fn new(
        global: &Global,
        playbook_path: &std::path::Path,
        env: &str,
        ctx: Option<&DeployContext>,
    ) -> anyhow::Result<Setup> {
        let pb = load_playbook(playbook_path)?;
        Setup::with_playbook(global, pb, env, ctx)
    }

    pub fn with_playbook(
        global: &Global,
        pb: Playbook,
        env: &str,
        ctx: Option<&DeployContext>,
    ) -> anyhow::Result<Setup> {
        let ov = Overrides {
            identity: global.identity.clone(),
            known_hosts: global.known_hosts.clone(),
            forks: global.forks,
            connect_timeout: global.connect_timeout,
            limit: global.limit.clone(),
        };
        let base = ctx.map(DeployContext::vars).unwrap_or_default();
        let (settings, hosts) = inventory::resolve(&pb, env, &base, &ov)
            .map_err(|e| UsageError(located_in_env(&pb, env, &e)))?;
        let connector = connector(&settings, &ov, global.accept_new)?;
        Ok(Setup {
            playbook: pb,
            env: env.to_string(),
            hosts,
            settings,
            connector,
            style: Style::detect(global.json),
        })
    }
}

/// `e` (an error found as environment `env`'s hosts were resolved, or in its `url:`), prefixed
/// with `file:line:column` when a template at fault in it can be found there.
pub fn located_in_env(pb: &Playbook, env: &str, e: &anyhow::Error) -> String {
    let needle = e
        .chain()
        .find_map(|c| c.downcast_ref::<crate::template::TemplateError>())
        .map(crate::template::TemplateError::needle);
    match needle.and_then(|n| crate::playbook::locate_in_env(&pb.path, env, &n)) {
        Some((l, c)) => format!("{}:{l}:{c}: {e:#}", pb.path.display()),
        None => format!("{e:#}"),
    }
}

/// The environments a command over all of them (check, status, history) covers: the one named, or
/// every one of which `--limit` keeps a host.
pub fn every_env(g: &Global, pb: &Playbook, target: &Target) -> anyhow::Result<Vec<String>> {
    if let Some(e) = &target.env {
        pb.environment(e).map_err(UsageError)?;
        return Ok(vec![e.clone()]);
    }
    let vars = DeployContext::placeholder().vars();
    let envs: Vec<String> = pb
        .environments
        .keys()
        .filter(|e| inventory::any_selected(pb, e, &vars, &g.limit))
        .cloned()
        .collect();
    if envs.is_empty() {
        return Err(UsageError(format!(
            "no host of any environment matches --limit {}",
            g.limit.join(", ")
        ))
        .into());
    }
    Ok(envs)
}

pub fn load_playbook(path: &std::path::Path) -> anyhow::Result<Playbook> {
    playbook::load(path).map_err(|e| UsageError(e.to_string()).into())
}

/// Credentials and known hosts for a run. Errors here are the user's to fix (exit 2).
fn connector(
    settings: &RunSettings,
    ov: &Overrides,
    accept_new: bool,
) -> anyhow::Result<Connector> {
    let credentials =
        keys::load(&settings.key, ov.identity.as_deref()).map_err(|e| UsageError(e.to_string()))?;
    let default_file = || -> PathBuf {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(".ssh/known_hosts")
    };
    // (With --accept-new, keys it recorded before in the default file are trusted too: else a
    // changed key there would pass for a new host.)
    let from_env = |text: String| -> anyhow::Result<KnownHosts> {
        let kh = KnownHosts::parse(&text, "SSH_KNOWN_HOSTS".into(), default_file());
        match accept_new {
            true => kh.with_recorded().map_err(|e| {
                UsageError(format!(
                    "cannot read known_hosts {}: {e}",
                    default_file().display()
                ))
                .into()
            }),
            false => Ok(kh),
        }
    };
    let known_hosts = match &settings.known_hosts {
        // A file named on purpose must exist, unless --accept-new is to start it.
        KnownHostsSource::File(p) if !accept_new && !p.exists() => {
            return Err(UsageError(format!(
                "known_hosts file {} does not exist: create it (ssh-keyscan -p PORT HOST > {0}, then check the fingerprints), or pass --accept-new to record host keys on first contact",
                p.display()
            ))
            .into());
        }
        KnownHostsSource::File(p) => KnownHosts::from_file(p)
            .map_err(|e| UsageError(format!("cannot read known_hosts {}: {e}", p.display())))?,
        KnownHostsSource::Env => {
            match crate::ci::text_variable("SSH_KNOWN_HOSTS").map_err(UsageError)? {
                Some(t) => from_env(t)?,
                None => {
                    return Err(UsageError(
                        "known_hosts: env is configured but SSH_KNOWN_HOSTS is not set".into(),
                    )
                    .into());
                }
            }
        }
        KnownHostsSource::Auto => {
            match crate::ci::text_variable("SSH_KNOWN_HOSTS").map_err(UsageError)? {
                Some(t) => from_env(t)?,
                None => KnownHosts::from_file(&default_file()).map_err(|e| {
                    UsageError(format!(
                        "cannot read known_hosts {}: {e}",
                        default_file().display()
                    ))
                })?,
            }
        }
    };
    Ok(Connector {
        credentials,
        known_hosts: Arc::new(Mutex::new(known_hosts)),
        accept_new,
        connect_timeout: settings.connect_timeout,
        handshakes: Arc::new(Semaphore::new(settings.forks.clamp(1, 8))),
    })
}

impl Target {
    /// The environment named by `--env`, for commands that need one.
    pub fn required_env(&self, command: &str) -> anyhow::Result<String> {
        self.env
            .clone()
            .ok_or_else(|| UsageError(format!("{command} needs --env: which environment?")).into())
    }
}

/// Run the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let g = &cli.global;
    match cli.command {
        Command::Check { target } => {
            let pb = load_playbook(&target.playbook)?;
            let envs = every_env(g, &pb, &target)?;
            let mut all = Vec::new();
            for env in envs {
                let s = Setup::with_playbook(g, pb.clone(), &env, None)?;
                let outcomes = fleet::run(
                    &s.connector,
                    &s.hosts,
                    s.settings.forks,
                    |host, session| async move {
                        let r = check::probe(&host, &session).await;
                        session.close().await;
                        r
                    },
                )
                .await;
                let rows = check::rows(&s.hosts, outcomes);
                if !s.style.json {
                    crate::out!(
                        "{}",
                        if target.env.is_none() {
                            format!("[{env}]\n")
                        } else {
                            String::new()
                        }
                    );
                    crate::out!("{}", check::render(&rows));
                }
                all.extend(rows.into_iter().map(|r| (env.clone(), r)));
            }
            if g.json {
                let v: Vec<_> = all
                    .iter()
                    .map(|(e, r)| {
                        let mut v = serde_json::to_value(r).expect("serializable");
                        v["env"] = e.clone().into();
                        v
                    })
                    .collect();
                crate::outln!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(if all.iter().all(|(_, r)| r.error.is_none()) {
                0
            } else {
                1
            })
        }
        Command::Exec {
            target,
            timeout,
            command,
        } => {
            let env = target.required_env("exec")?;
            let s = Setup::new(g, &target.playbook, &env, None)?;
            let argv = &command;
            // (A NUL byte cannot reach a remote command: a usage error, before any host.)
            crate::shell::join(argv).map_err(|e| UsageError(e.to_string()))?;
            let json = g.json;
            let outcomes = fleet::run(
                &s.connector,
                &s.hosts,
                s.settings.forks,
                |host, session| async move {
                    let name = host.name().to_string();
                    let sink = move |stream: Stream, line: &[u8]| {
                        if json {
                            return;
                        }
                        let line = String::from_utf8_lossy(line);
                        match stream {
                            Stream::Stdout => crate::outln!("{name} | {line}"),
                            Stream::Stderr => crate::errln!("{name} ! {line}"),
                        }
                    };
                    // (Watched: past its timeout, or with ferry stopped, the command is stopped.)
                    let out = session.run_watched(argv, &[], timeout, Some(&sink)).await;
                    session.close().await;
                    Ok(out?)
                },
            )
            .await;
            let mut rows = Vec::new();
            let mut json_out = Vec::new();
            let mut ok = true;
            for o in &outcomes {
                let (status, err) = match &o.result {
                    Ok(out) if out.success() => ("0".to_string(), None),
                    Ok(out) => {
                        ok = false;
                        (
                            out.status
                                .map(|s| s.to_string())
                                .unwrap_or_else(|| "signal".into()),
                            None,
                        )
                    }
                    Err(e) => {
                        ok = false;
                        ("-".to_string(), Some(format!("{e:#}")))
                    }
                };
                if json {
                    let (stdout, stderr) = match &o.result {
                        Ok(out) => (
                            String::from_utf8_lossy(&out.stdout).into_owned(),
                            String::from_utf8_lossy(&out.stderr).into_owned(),
                        ),
                        Err(_) => (String::new(), String::new()),
                    };
                    // `exit` is the number, or null when the command died of a signal or never ran.
                    let exit = o.result.as_ref().ok().and_then(|out| out.status);
                    json_out.push(serde_json::json!({"host": o.host, "exit": exit, "stdout": stdout, "stderr": stderr, "error": err}));
                }
                rows.push(vec![
                    o.host.clone(),
                    status,
                    report::human_duration(o.elapsed),
                    err.unwrap_or_default(),
                ]);
            }
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&json_out)?);
            } else {
                crate::errln!(
                    "\n{}",
                    report::table(&["HOST", "EXIT", "TIME", "ERROR"], &rows).trim_end()
                );
            }
            Ok(if ok { 0 } else { 1 })
        }
        Command::Deploy { target, refs, opts } => {
            deploy::cli_deploy(g, &target, &refs, &opts, deploy::Scope::All).await
        }
        Command::Sync { target, refs, opts } => {
            deploy::cli_deploy(g, &target, &refs, &opts, deploy::Scope::SyncOnly).await
        }
        Command::Rollback {
            target,
            refs,
            to,
            opts,
        } => deploy::cli_rollback(g, &target, &refs, to.as_deref(), &opts).await,
        Command::Stop { target, refs, opts } => deploy::cli_stop(g, &target, &refs, &opts).await,
        Command::Status { target, ref_name } => {
            crate::status::cli_status(g, &target, ref_name.as_deref()).await
        }
        Command::History {
            target,
            ref_name,
            limit_entries,
        } => crate::status::cli_history(g, &target, ref_name.as_deref(), limit_entries).await,
        Command::Lock {
            command: LockCommand::Status { target },
        } => crate::lock::cli_status(g, &target).await,
        Command::Unlock { target, force } => crate::lock::cli_unlock(g, &target, force).await,
    }
}

/// Exit code for an error that escaped a command.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.downcast_ref::<UsageError>().is_some() {
        2
    } else {
        1
    }
}
