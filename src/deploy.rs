//! Deploy orchestration: from a ref to environments (rules), then per host: lock, run the steps in
//! order, record the attempt in the host's ledger, unlock. Also rollback and stop, which walk the
//! same steps. Step modules (`sync`, `docker`) do the work; this module sequences and reports, and
//! runs the `run` steps (argv or a checked shell string, secrets on stdin) itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::ci::DeployContext;
use crate::cli::{DeployOpts, Global, RefArgs, Setup, Target, UsageError};
use crate::inventory::Host;
use crate::ledger::{self, Record};
use crate::lock::Lock;
use crate::playbook::{Command, RunStep, Step};
use crate::report::{self, Progress, Section, Style};
use crate::ssh::{Session, SshError};
use crate::template::TemplateError;
use crate::{docker, fleet, gitlab, rules, shell, sync};

/// Which steps a run executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    SyncOnly,
}

/// What a step sees: the host, its connection, and the run's facts.
#[derive(Clone)]
pub struct StepCtx<'a> {
    pub host: &'a Host,
    pub session: &'a Session,
    pub deploy: &'a DeployContext,
    pub app: &'a str,
    pub env: &'a str,
    /// The playbook, as given: for commands that an error suggests.
    pub playbook: &'a std::path::Path,
    /// This run's release id, the same on every host: `20261122T134500.250Z-1a2b3c4d`.
    pub release: &'a str,
    /// Dry run: report what would change, change nothing.
    pub plan: bool,
    pub progress: &'a Progress,
    pub style: Style,
    /// Turns true on SIGINT/SIGTERM: for steps that stop at a safe point themselves (sync).
    pub stop: watch::Receiver<bool>,
    /// A deploy to several hosts at once: where sync steps wait for each other before switching.
    pub gate: Option<&'a crate::gate::Gate>,
    /// The deploy lock this run holds on the host (its directory and token), for a sync step's
    /// script to check right before it switches: a lock whose lease ran out unrenewed may have
    /// been taken over by another run.
    pub held: Option<(&'a str, &'a str)>,
    /// A failure later in the run can switch this step back: steps follow it, or other hosts
    /// (the gate) may fail. A sync step then keeps what the switch back needs.
    pub switched_back_on_failure: bool,
}

/// What a step did, for the summary, the ledger and `--json`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StepReport {
    pub step: String,
    /// False when the host already matched (no-op).
    pub changed: bool,
    /// One line for the summary table.
    pub summary: String,
    pub files_sent: u64,
    pub bytes_sent: u64,
    /// Lines shown in the step's log section.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub log: Vec<String>,
    /// Step-specific facts (plan details, container ids, ...).
    #[serde(skip_serializing_if = "serde_json::Value::is_null", default)]
    pub detail: serde_json::Value,
}

/// One host's deploy result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostReport {
    pub host: String,
    pub env: String,
    pub ok: bool,
    pub steps: Vec<StepReport>,
    pub error: Option<String>,
    pub seconds: f64,
}

/// A new release id: UTC time to the millisecond then short sha, so ids sort by time, name the
/// commit, and two deploys of one commit in the same second (deploys of one host are serialised
/// by its lock) still get different ids.
pub fn release_id(ctx: &DeployContext) -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
    );
    format!(
        "{}-{}",
        now.format(fmt).expect("formattable"),
        ctx.short_sha()
    )
}

/// The run's ref and commit; see [`DeployContext::detect`] for `ships_commit`.
fn context(refs: &RefArgs, ships_commit: bool) -> anyhow::Result<DeployContext> {
    DeployContext::detect(
        refs.ref_name.as_deref(),
        refs.sha.as_deref(),
        refs.tag,
        ships_commit,
    )
    .map_err(|e| UsageError(format!("{e:#}")).into())
}

/// The environments this run deploys: `--env`, or the ref's rule.
fn environments(
    pb: &crate::playbook::Playbook,
    target: &Target,
    ctx: &DeployContext,
) -> anyhow::Result<Vec<String>> {
    if let Some(e) = &target.env {
        return Ok(vec![e.clone()]);
    }
    if pb.rules.is_empty() {
        return Err(UsageError(format!("{} has no rules: pass --env", pb.path.display())).into());
    }
    Ok(rules::select(&pb.rules, &ctx.ref_name, ctx.is_tag)
        .map(<[String]>::to_vec)
        .unwrap_or_default())
}

/// `ferry deploy` / `ferry sync`.
pub async fn cli_deploy(
    g: &Global,
    target: &Target,
    refs: &RefArgs,
    opts: &DeployOpts,
    scope: Scope,
) -> anyhow::Result<i32> {
    let ctx = context(refs, true)?;
    let pb = crate::cli::load_playbook(&target.playbook)?;
    let envs = environments(&pb, target, &ctx)?;
    if envs.is_empty() {
        let kind = if ctx.is_tag { "tag" } else { "branch" };
        nothing_to_do(g, &format!("nothing to deploy for {kind}"), &ctx.ref_name);
        return Ok(0);
    }
    // Every environment's configuration is checked before any host is touched.
    let setups = setups(g, &pb, &envs, &ctx)?;
    let runs = |s: &Step| scope == Scope::All || matches!(s, Step::Sync(_));
    let steps_of = |setup: &Setup| -> Vec<Step> {
        pb.environments[&setup.env]
            .steps
            .iter()
            .filter(|s| runs(s))
            .cloned()
            .collect()
    };
    for setup in &setups {
        preflight(setup, Checked::Steps(&runs), opts.plan, false)?;
    }
    let mut reports = Vec::new();
    for setup in &setups {
        reports.extend(run_env(setup, &ctx, &steps_of(setup), opts, Action::Deploy).await?);
    }
    finish(g, opts.plan, &reports)
}

/// `ferry rollback`.
pub async fn cli_rollback(
    g: &Global,
    target: &Target,
    refs: &RefArgs,
    to: Option<&str>,
    opts: &DeployOpts,
) -> anyhow::Result<i32> {
    let env = target.required_env("rollback")?;
    let pb = crate::cli::load_playbook(&target.playbook)?;
    // The ledger names the release to go back to; the ref only matters where paths depend on it.
    let ctx = match context(refs, false) {
        Ok(c) => c,
        Err(_) if !crate::status::is_per_branch(&pb, &env) => DeployContext::placeholder(),
        Err(e) => return Err(e),
    };
    let setup = Setup::with_playbook(g, pb, &env, Some(&ctx))?;
    let steps = setup.playbook.environments[&env].steps.clone();
    preflight(&setup, Checked::Steps(&|_| true), opts.plan, true)?;
    let reports = run_env(
        &setup,
        &ctx,
        &steps,
        opts,
        Action::Rollback(to.map(str::to_string), Default::default()),
    )
    .await?;
    finish(g, opts.plan, &reports)
}

/// `ferry stop`: run the environment's `on_stop` steps for a ref. Without `--env`, the ref's rule
/// names the environments (as in a GitLab `on_stop` job, where only the CI variables are given).
pub async fn cli_stop(
    g: &Global,
    target: &Target,
    refs: &RefArgs,
    opts: &DeployOpts,
) -> anyhow::Result<i32> {
    let ctx = context(refs, false)?;
    let pb = crate::cli::load_playbook(&target.playbook)?;
    let envs = environments(&pb, target, &ctx)?;
    if let Some(e) = &target.env {
        pb.environment(e).map_err(UsageError)?;
        if pb.environments[e].on_stop.is_empty() {
            return Err(UsageError(format!(
                "environment `{e}` has no on_stop steps: add them to the playbook to stop a branch"
            ))
            .into());
        }
    }
    let envs: Vec<String> = envs
        .into_iter()
        .filter(|e| !pb.environments[e].on_stop.is_empty())
        .collect();
    if envs.is_empty() {
        nothing_to_do(g, "nothing to stop for", &ctx.ref_name);
        return Ok(0);
    }
    let setups = setups(g, &pb, &envs, &ctx)?;
    for setup in &setups {
        preflight(setup, Checked::OnStop, opts.plan, false)?;
    }
    let mut reports = Vec::new();
    for setup in &setups {
        let steps = pb.environments[&setup.env].on_stop.clone();
        reports.extend(run_env(setup, &ctx, &steps, opts, Action::Stop).await?);
    }
    finish(g, opts.plan, &reports)
}

/// The steps a preflight checks: those of the environment's `steps` that will run, or its
/// `on_stop`.
enum Checked<'a> {
    Steps(&'a dyn Fn(&Step) -> bool),
    OnStop,
}

/// An image reference of a step, expanded for `host`, that docker would take (a tag from a git
/// tag such as `v1.0+build` would fail only once the build ran).
fn image(host: &Host, step: &str, template: &str) -> anyhow::Result<String> {
    let r = host.expand(template)?;
    if let Some(why) = docker::spec::reference_problem(&r) {
        anyhow::bail!("{}: {step} `{r}`: {why}", host.name());
    }
    Ok(r)
}

/// Each step's values for each host (paths, container specs, secrets), worked out before any host
/// is touched: a bad value stops the run with exit 2 instead of failing on one host half-way. An
/// error about a template points at its line and column in the playbook.
fn preflight(setup: &Setup, section: Checked, plan: bool, rollback: bool) -> anyhow::Result<()> {
    let env = &setup.playbook.environments[&setup.env];
    let (key, steps): (&str, Vec<(usize, &Step)>) = match section {
        Checked::Steps(runs) => (
            "steps",
            env.steps
                .iter()
                .enumerate()
                .filter(|(_, s)| runs(s))
                .collect(),
        ),
        Checked::OnStop => ("on_stop", env.on_stop.iter().enumerate().collect()),
    };
    // Returns a sync step's target, which the steps' targets on the host are checked against.
    let check = |host: &Host, step: &Step| -> anyhow::Result<Option<String>> {
        match step {
            Step::Sync(s) => {
                let to = sync::target_paths(host, &s.to)
                    .map_err(|e| at_field(e, "to:"))?
                    .to;
                // (A rollback reads no `from`.)
                if !rollback {
                    let from = host.expand(&s.from)?;
                    let path = std::path::Path::new(&from);
                    let problem = if path.exists() && !path.is_dir() {
                        "that is a file, not a directory; `from:` names the directory whose \
                         contents are shipped (its parent, say)"
                    } else if !path.is_dir() {
                        "no such directory here; build it first, or fix `from:` (a relative path \
                         is read from the directory ferry runs in)"
                    } else {
                        return Ok(Some(to));
                    };
                    return Err(FieldError {
                        field: "from:",
                        msg: format!("{}: sync from `{from}`: {problem}", host.name()),
                    }
                    .into());
                }
                return Ok(Some(to));
            }
            // (Nor runs any `run` step.)
            Step::Run(_) if rollback => {}
            Step::SyncRemove(s) => {
                sync::target_paths(host, &s.to).map_err(|e| at_field(e, "to:"))?;
            }
            Step::Container(c) | Step::Accessory(c) => {
                docker::resolve(host, c)?;
            }
            Step::Run(r) => {
                command_argv(host, &r.command)?;
                if !plan {
                    run_secrets(r)?;
                }
            }
            // (Nor any image step.)
            _ if rollback => {}
            Step::DockerLogin(s) => {
                host.expand(&s.registry)?;
                host.expand(&s.user)?;
                if let Err(why) = crate::ci::password_var(&s.password_env) {
                    anyhow::bail!(
                        "docker_login: environment variable {}, {why}: it must hold the registry \
                         password (a masked CI/CD variable)",
                        s.password_env
                    );
                }
            }
            Step::DockerBuild(b) => {
                host.path(&b.context)?;
                image(host, "docker_build", &b.tag)?;
                if let Some(f) = &b.file {
                    host.expand(f)?;
                }
                for v in b.build_args.values() {
                    host.expand(v)?;
                }
            }
            Step::DockerTag(t) => {
                image(host, "docker_tag", &t.source)?;
                image(host, "docker_tag", &t.target)?;
            }
            Step::DockerPush(p) => {
                image(host, "docker_push", &p.image)?;
            }
            Step::DockerPull(i) => {
                image(host, "docker_pull", &i.image)?;
            }
            Step::DockerPrune(p) => {
                host.expand(&p.repository)?;
            }
            Step::DockerRemove(r) => {
                host.expand(&r.name)?;
            }
        }
        Ok(None)
    };
    let located = |i: usize, e: anyhow::Error| {
        let needle = e.chain().find_map(|c| {
            if let Some(t) = c.downcast_ref::<TemplateError>() {
                return Some(t.needle());
            }
            if let Some(f) = c.downcast_ref::<FieldError>() {
                return Some(f.field.to_string());
            }
            match c.downcast_ref::<docker::spec::SpecError>() {
                Some(docker::spec::SpecError::Template { error, .. }) => Some(error.needle()),
                _ => None,
            }
        });
        let path = &setup.playbook.path;
        let at = needle.and_then(|n| crate::playbook::locate_in_step(path, &setup.env, key, i, &n));
        match at {
            Some((l, c)) => UsageError(format!("{}:{l}:{c}: {e:#}", path.display())),
            None => UsageError(format!("{e:#}")),
        }
    };
    // The environment's `url:` (for GitLab's environment link) is a template too.
    if let (Some(url), Some(host)) = (&env.url, setup.hosts.first()) {
        host.expand(url).map_err(|e| {
            let e = e.context(format!("environment `{}`: url", setup.env));
            UsageError(crate::cli::located_in_env(&setup.playbook, &setup.env, &e))
        })?;
    }
    for host in &setup.hosts {
        let mut targets = Vec::new();
        for &(i, step) in &steps {
            let Some(to) = check(host, step).map_err(|e| located(i, e))? else {
                continue;
            };
            targets.push(to);
            // (The step whose target overlaps one before it is the one pointed at.)
            if let Err(e) = sync::disjoint(host.name(), &targets) {
                let path = &setup.playbook.path;
                return Err(
                    match crate::playbook::locate_in_step(path, &setup.env, key, i, "to:") {
                        Some((l, c)) => UsageError(format!("{}:{l}:{c}: {e:#}", path.display())),
                        None => UsageError(format!("{e:#}")),
                    }
                    .into(),
                );
            }
        }
    }
    Ok(())
}

/// An error about one field of a step (not a template in it): `preflight` points at the field.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
struct FieldError {
    field: &'static str,
    msg: String,
}

/// `e` as an error about `field`, unless a template in it is at fault (pointed at instead).
fn at_field(e: anyhow::Error, field: &'static str) -> anyhow::Error {
    match e.chain().any(|c| c.is::<TemplateError>()) {
        true => e,
        false => FieldError {
            field,
            msg: format!("{e:#}"),
        }
        .into(),
    }
}

fn setups(
    g: &Global,
    pb: &crate::playbook::Playbook,
    envs: &[String],
    ctx: &DeployContext,
) -> anyhow::Result<Vec<Setup>> {
    envs.iter()
        .map(|env| Setup::with_playbook(g, pb.clone(), env, Some(ctx)))
        .collect()
}

/// A ref with nothing to do exits 0 with one line (an empty host list with `--json`).
fn nothing_to_do(g: &Global, what: &str, ref_name: &str) {
    if g.json {
        crate::outln!("[]");
        crate::errln!("{what} {}", shell::quote_str(ref_name));
    } else {
        crate::outln!("{what} {}", shell::quote_str(ref_name));
    }
}

#[derive(Debug, Clone)]
enum Action {
    Deploy,
    /// The release to go back to (`--to`, or the ledger's choice), and per sync target (by
    /// path) the files release that deploy left live there.
    Rollback(Option<String>, BTreeMap<String, String>),
    Stop,
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Rollback(..) => "rollback",
            Action::Stop => "stop",
        }
    }
}

async fn run_env(
    setup: &Setup,
    ctx: &DeployContext,
    steps: &[Step],
    opts: &DeployOpts,
    action: Action,
) -> anyhow::Result<Vec<HostReport>> {
    let release = release_id(ctx);
    let progress = Progress::new(setup.style);
    // GitLab hears about deploys of this commit. A stop deploys nothing; a rollback puts back an
    // older commit (each host's own choice from its ledger), which this job's commit status and
    // deployment would misreport.
    let gitlab = if opts.plan || !matches!(action, Action::Deploy) {
        None
    } else {
        // (The first host's values: `preflight` checked the url expands with them.)
        let url = setup.playbook.environments[&setup.env]
            .url
            .as_ref()
            .and_then(|u| setup.hosts.first()?.expand(u).ok());
        gitlab::Reporter::new(&setup.playbook, ctx, &setup.env, url)
    };
    // (GitLab hears "running" while the hosts are being deployed: a slow API holds up no host.)
    let running = async {
        if let Some(r) = &gitlab {
            r.report(gitlab::State::Running, None).await;
        }
    };
    let app = setup.playbook.app.as_str();
    let env = setup.env.as_str();
    let started = Instant::now();
    let action = Arc::new(action);
    let (interrupt, stop) = watch_interrupts();
    let run_token = &crate::lock::run_token();
    let per_branch = crate::status::is_per_branch(&setup.playbook, env);
    if let (Action::Deploy, Some(first)) = (action.as_ref(), setup.hosts.first()) {
        crate::sync::prefetch(
            first,
            steps.iter().filter_map(|s| match s {
                Step::Sync(s) => Some(s),
                _ => None,
            }),
        );
    }
    // Sync steps switch together when every host runs at once (see `gate`).
    let gate = (matches!(action.as_ref(), Action::Deploy)
        && !opts.plan
        && setup.hosts.len() > 1
        && setup.hosts.len() <= setup.settings.forks)
        .then(|| crate::gate::Gate::new(setup.hosts.iter().map(|h| h.name())));
    let gate = gate.as_ref();
    let deployed = fleet::run_with(
        &setup.connector,
        &setup.hosts,
        setup.settings.forks,
        Some(&stop),
        |host, session| {
            let (progress, release, action) = (&progress, release.as_str(), action.clone());
            let stop = stop.clone();
            async move {
                let sctx = StepCtx {
                    host: &host,
                    session: &session,
                    deploy: ctx,
                    app,
                    env,
                    playbook: &setup.playbook.path,
                    release,
                    plan: opts.plan,
                    progress,
                    style: setup.style,
                    stop,
                    gate,
                    held: None,
                    switched_back_on_failure: false,
                };
                let r = run_host(&sctx, steps, opts, &action, run_token, per_branch).await;
                session.close().await;
                r
            }
        },
        |o| {
            if let Some(g) = gate
                && !matches!(&o.result, Ok(r) if r.ok)
            {
                g.fail(&o.host);
            }
        },
    );
    let (outcomes, ()) = tokio::join!(deployed, running);
    interrupt.abort();
    let reports: Vec<HostReport> = outcomes
        .into_iter()
        .map(|o| match o.result {
            Ok(r) => r,
            Err(e) => HostReport {
                host: o.host,
                env: env.to_string(),
                ok: false,
                steps: vec![],
                error: Some(format!("{e:#}")),
                seconds: o.elapsed.as_secs_f64(),
            },
        })
        .collect();
    if let Some(r) = &gitlab {
        let ok = reports.iter().all(|r| r.ok);
        let state = match (ok, *stop.borrow()) {
            (true, _) => gitlab::State::Success,
            (false, true) => gitlab::State::Canceled,
            (false, false) => gitlab::State::Failed,
        };
        r.report(state, Some(started.elapsed())).await;
    }
    Ok(reports)
}

/// Watch for Ctrl-C and SIGTERM (a cancelled CI job): the first one stops the steps on every host,
/// which then record the interruption and release their locks; a second one exits at once.
fn watch_interrupts() -> (tokio::task::JoinHandle<()>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        let mut int = match signal(SignalKind::interrupt()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        crate::errln!(
            "interrupted: stopping the steps (a sync whose stream is all sent finishes first; a container waiting for its health check is put back; containers this run replaced and then its files are switched back, unless that was the last step), recording the attempt and releasing locks (again to quit at once)"
        );
        let _ = tx.send(true);
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        std::process::exit(130);
    });
    (task, rx)
}

/// Returns once SIGINT or SIGTERM came (never, for a receiver whose sender is gone).
pub async fn interrupted(stop: &watch::Receiver<bool>) {
    if stop.clone().wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One host: lock, steps, ledger, unlock. Step failures become a failed report, not an `Err`, so
/// that they are recorded; `Err` is for failures before anything ran (lock held, ...).
async fn run_host(
    ctx: &StepCtx<'_>,
    steps: &[Step],
    opts: &DeployOpts,
    action: &Action,
    run_token: &str,
    per_branch: bool,
) -> anyhow::Result<HostReport> {
    let started = Instant::now();
    let started_at = report::unix_now();
    let lock = if ctx.plan {
        None
    } else {
        let acquire = async {
            if let Some(g) = ctx.gate
                && let Err(first) = g.lock_turn(ctx.host.name()).await
            {
                anyhow::bail!(
                    "{}: not locked, nothing changed: {first}, which takes its lock before this \
                     host, failed first",
                    ctx.host.name()
                );
            }
            let lock = Lock::acquire(ctx, run_token, opts.lock_wait).await?;
            if let Some(g) = ctx.gate {
                g.locked(ctx.host.name());
            }
            Ok(lock)
        };
        tokio::select! {
            l = acquire => Some(l?),
            _ = interrupted(&ctx.stop) => anyhow::bail!("interrupted before the deploy lock was taken"),
        }
    };
    tracing::debug!(elapsed = ?started.elapsed(), "locked");
    // A rollback goes to an earlier deploy from the ledger (read under the lock), and is recorded
    // with that deploy's ref, commit and release. (A plan reads it too, so that it shows the
    // rollback that would run.) A per-branch run checks that no other branch with its slug is on
    // the host's record, and a stop that cannot tell its commit (outside CI and git) records the
    // one it stops: the ref's last good deploy's.
    let unknown_commit = matches!(action, Action::Stop) && ctx.deploy.commit_unknown();
    let mut stopped = None;
    let target =
        match action {
            Action::Rollback(to, _) => {
                let cut = lock.as_ref().is_some_and(|l| l.taken_over.is_some());
                rollback_target(ctx, to.as_deref(), per_branch, cut).await
            }
            _ if per_branch || unknown_commit => ledger::read(ctx.host, ctx.session)
                .await
                .and_then(|records| {
                    if unknown_commit {
                        stopped = last_good_commit(ctx, &records);
                    }
                    if per_branch {
                        slug_shared(ctx, action, &records)?;
                    }
                    Ok(None)
                }),
            _ => Ok(None),
        };
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            if let Some(lock) = lock {
                // (A refusal for a shared slug is an attempt of this branch: `history` and
                // `status` show it.)
                let appending;
                let record = match e.downcast_ref::<SlugClash>() {
                    Some(_) => {
                        let why = e.to_string();
                        let r = Record::new(
                            ctx,
                            action.name(),
                            &[],
                            false,
                            Some(&why),
                            started_at,
                            started.elapsed(),
                        );
                        appending = ledger::Appending::new(ctx, std::slice::from_ref(&r));
                        Some(&appending)
                    }
                    None => None,
                };
                let _ = lock.release_after(ctx.session, record).await;
            }
            return Err(e);
        }
    };
    let target_ctx = match (&target, stopped) {
        (Some(t), _) => Some(t.context()),
        (None, Some(sha)) => Some(DeployContext {
            sha,
            ..ctx.deploy.clone()
        }),
        (None, None) => None,
    };
    let held_at = lock.as_ref().map(Lock::path);
    let ctx = &StepCtx {
        host: ctx.host,
        session: ctx.session,
        deploy: target_ctx.as_ref().unwrap_or(ctx.deploy),
        app: ctx.app,
        env: ctx.env,
        playbook: ctx.playbook,
        release: target.as_ref().map_or(ctx.release, |t| t.release.as_str()),
        plan: ctx.plan,
        progress: ctx.progress,
        style: ctx.style,
        stop: ctx.stop.clone(),
        gate: ctx.gate,
        held: held_at.as_deref().zip(Some(run_token)),
        switched_back_on_failure: false,
    };
    let action = &match (action, &target) {
        (Action::Rollback(..), Some(t)) => {
            ctx.progress.println(&format!(
                "{}: rolling back to release {} (ref {}, commit {})",
                ctx.host.name(),
                t.release,
                shell::quote_str(&t.ref_name),
                ctx.deploy.short_sha()
            ));
            Action::Rollback(t.files_release.clone(), t.files_releases.clone())
        }
        (a, _) => a.clone(),
    };
    // Steps run while the lock's lease is renewed. Losing the lock stops the deploy before the next
    // step; an interrupt also cuts off a running step unless that would leave the host worse.
    let lost: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let steps_run = async {
        // (A deploy that took over the lock of a run that ended unrecorded goes back first.)
        let (mut reports, error) = match (action, &lock) {
            (Action::Deploy, Some(l)) if l.taken_over.is_some() => {
                recover(ctx, steps, per_branch, &lost).await
            }
            _ => (Vec::new(), None),
        };
        if error.is_some() {
            return (reports, error);
        }
        let (ran, error) = run_steps(ctx, steps, action, &lost).await;
        reports.extend(ran);
        (reports, error)
    };
    // A host that answers no renewal for a whole lease is gone: the step in progress, which may
    // wait on it for ever, is given half a lease more, then abandoned.
    let renew = async {
        if let Some(lock) = &lock {
            let e = lock.keep_alive(ctx.session).await;
            ctx.progress
                .println(&format!("{}: WARNING: {e}", ctx.host.name()));
            *lost.lock().unwrap() = Some(e.to_string());
            if matches!(e, crate::lock::LockError::Unreachable { .. }) {
                tokio::time::sleep(lock.lease() / 2).await;
                return e.to_string();
            }
        }
        std::future::pending::<String>().await
    };
    let (reports, error, lock) = tokio::select! {
        (reports, error) = steps_run => (reports, error, lock),
        // (Nor can the run be recorded, or the lock released: it expires by itself.)
        why = renew => (
            Vec::new(),
            Some(format!("{why}; the step in progress was abandoned, and the run is not recorded")),
            None,
        ),
    };
    let mut ok = error.is_none();
    let mut error = error;
    // The ledger record, then the unlock, in one exec (a plan holds no lock and records nothing).
    // A run that could not be recorded fails (status and rollback would not know it), though
    // what it did stands; a lock left behind expires with its lease or `ferry unlock`.
    if let Some(lock) = lock {
        let mut record = Record::new(
            ctx,
            action.name(),
            &reports,
            ok,
            error.as_deref(),
            started_at,
            started.elapsed(),
        );
        (record.files_releases, record.files_release) = live_releases(&reports);
        // (A run whose lock this one took over ended unrecorded: it goes first.)
        let mut records: Vec<Record> = lock
            .taken_over
            .iter()
            .map(|h| {
                Record::interrupted(
                    ctx.app,
                    ctx.env,
                    ctx.host.name(),
                    h,
                    "a later run took over its lock",
                )
            })
            .collect();
        records.push(record);
        let appending = ledger::Appending::new(ctx, &records);
        match lock.release_after(ctx.session, Some(&appending)).await {
            Ok(stderr) if ledger::Appending::failed(&stderr) => {
                let why = format!(
                    "cannot record the {} in {}/ledger.jsonl ({}); what it did stands, but \
                     `ferry status` and `ferry rollback` do not know it: fix that (a full disk?), \
                     then run it again",
                    action.name(),
                    ctx.host.state_dir(),
                    stderr.trim().replace('\n', "; ")
                );
                ctx.progress
                    .println(&format!("{}: ERROR: {why}", ctx.host.name()));
                ok = false;
                error = Some(match error {
                    Some(e) => format!("{e}; and {why}"),
                    None => why,
                });
            }
            Ok(_) => {}
            // (Whether the record went in is not known: the run fails, as one not recorded does.)
            Err(e) => {
                let why = format!(
                    "{e}; the {} may not be recorded in {}/ledger.jsonl: what it did stands; \
                     check `ferry status` and `ferry lock status`",
                    action.name(),
                    ctx.host.state_dir()
                );
                ctx.progress
                    .println(&format!("{}: ERROR: {why}", ctx.host.name()));
                ok = false;
                error = Some(match error {
                    Some(e) => format!("{e}; and {why}"),
                    None => why,
                });
            }
        }
        tracing::debug!(elapsed = ?started.elapsed(), "recorded in the ledger and unlocked");
    }
    Ok(HostReport {
        host: ctx.host.name().to_string(),
        env: ctx.env.to_string(),
        ok,
        steps: reports,
        error,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The steps in order, stopping at the first failure: their reports and the error, if any.
async fn run_steps(
    ctx: &StepCtx<'_>,
    steps: &[Step],
    action: &Action,
    lost: &std::sync::Mutex<Option<String>>,
) -> (Vec<StepReport>, Option<String>) {
    let mut reports = Vec::new();
    let mut error = None;
    for (i, step) in steps.iter().enumerate() {
        if let Some(why) = lost.lock().unwrap().clone() {
            error = Some(format!(
                "stopped before step {} ({}): {why}",
                i + 1,
                step.kind()
            ));
            break;
        }
        if *ctx.stop.borrow() {
            error = Some(format!(
                "interrupted (SIGINT/SIGTERM) before step {} ({})",
                i + 1,
                step.kind()
            ));
            if matches!(action, Action::Deploy | Action::Rollback(..)) {
                revert_run(ctx, &steps[..i], &mut reports, action).await;
            }
            break;
        }
        let name = format!("{}_{}_{}_{}", ctx.env, ctx.host.name(), i + 1, step.kind());
        let mut section = Section::start(
            ctx.style,
            &name,
            &format!("{}: {} ({})", ctx.host.name(), step.kind(), action.name()),
        );
        let work = async {
            match action {
                Action::Deploy | Action::Stop => {
                    let ctx = &StepCtx {
                        switched_back_on_failure: ctx.gate.is_some() || i + 1 < steps.len(),
                        ..ctx.clone()
                    };
                    run_step(ctx, step).await
                }
                Action::Rollback(to, per_path) => {
                    rollback_step(ctx, step, to.as_deref(), per_path).await
                }
            }
        };
        // A container step finishes once past its pull (it never leaves a service without its
        // container); a sync step stops itself at a safe point (before its switch, the host
        // cleaned up; once its whole stream is sent, it finishes and is switched back below like
        // the steps before it); a store removal finishes; any other step is cut off at once (a
        // `run` command's channel closes, and the host stops the command: see
        // `Session::run_watched`).
        let finishes = match step {
            Step::Container(_) | Step::Accessory(_) => true,
            // (Removing a store is short, and cut off it would go on after the unlock.)
            Step::Sync(_) | Step::SyncRemove(_) => !ctx.plan,
            _ => false,
        };
        let result = if finishes {
            work.await
        } else {
            tokio::select! {
                r = work => r,
                _ = interrupted(&ctx.stop) => {
                    Err(anyhow::anyhow!("interrupted (SIGINT/SIGTERM) during the step"))
                }
            }
        };
        match result {
            Ok(Some(r)) => {
                // (A plan is the run's result: printed on stdout at the end, see `finish`.)
                for line in r.log.iter().filter(|_| !ctx.plan) {
                    section.line(ctx.progress, &format!("{}: {line}", ctx.host.name()));
                }
                if !ctx.style.json && !ctx.plan {
                    section.line(
                        ctx.progress,
                        &format!("{}: {}: {}", ctx.host.name(), step.kind(), r.summary),
                    );
                }
                reports.push(r);
                drop(section);
            }
            Ok(None) => drop(section),
            Err(e) => {
                let msg = format!("{e:#}");
                section.expand();
                section.line(
                    ctx.progress,
                    &format!("{}: {} FAILED: {msg}", ctx.host.name(), step.kind()),
                );
                drop(section);
                reports.push(StepReport {
                    step: step.kind().into(),
                    summary: "failed".into(),
                    ..Default::default()
                });
                error = Some(format!("step {} ({}): {msg}", i + 1, step.kind()));
                if matches!(action, Action::Deploy | Action::Rollback(..)) {
                    revert_run(ctx, &steps[..i], &mut reports, action).await;
                }
                break;
            }
        }
    }
    if error.is_none() && matches!(action, Action::Deploy) && !ctx.plan {
        commit_run(ctx, steps, &reports).await;
    }
    (reports, error)
}

/// Whether a step report is of a service container the run created or replaced.
fn switched(r: &StepReport) -> bool {
    r.step == "container" && r.changed && r.detail.get("switched") == Some(&true.into())
}

/// Whether this run's reports say it switched the service container `name`.
fn switched_container(reports: &[StepReport], name: &str) -> bool {
    reports
        .iter()
        .any(|r| switched(r) && r.detail.get("name").and_then(|v| v.as_str()) == Some(name))
}

/// After a successful deploy: of each service container it replaced, the container kept for
/// rollback before the run goes (`docker::commit`); until then a revert could need it.
async fn commit_run(ctx: &StepCtx<'_>, steps: &[Step], reports: &[StepReport]) {
    for step in steps {
        let Step::Container(c) = step else { continue };
        let Ok(name) = docker::resolve(ctx.host, c).map(|r| r.spec.name) else {
            continue;
        };
        if switched_container(reports, &name)
            && let Err(e) = docker::commit(ctx, c).await
        {
            ctx.progress
                .println(&format!("{}: warning: {e:#}", ctx.host.name()));
        }
    }
}

/// A deploy or rollback that failed (or was interrupted) after it switched things must not leave
/// half of them live. A deploy's service containers go back to the ones they replaced (kept as
/// `NAME.ferry-prev`), newest first; then each sync target goes back on the release it replaced (a
/// deploy's report says `release` and `previous`, a rollback's `to` and `from`; the report is
/// found by its path, since a rollback leaves none for steps with nothing to undo). Files put back
/// under a container that stays new would run it on other files than it was started with (bind
/// mounts): when a container cannot go back (none kept to go back to: checked for all before any
/// moves; or it fails its health check), the files stay with it.
async fn revert_run(
    ctx: &StepCtx<'_>,
    done: &[Step],
    reports: &mut Vec<StepReport>,
    action: &Action,
) {
    // Switching back is what an interrupt asks for: it does not stop for one.
    let ctx = &StepCtx {
        stop: watch::channel(false).1,
        ..*ctx
    };
    if ctx.plan {
        return;
    }
    let (host, what) = (ctx.host.name(), action.name());
    let stay = |why: &str| {
        ctx.progress.println(&format!(
            "{host}: the {what} stopped after the service container was switched{why}: the files \
             stay on the new release with it (`ferry rollback` takes files and containers back)"
        ))
    };
    let count = reports.iter().filter(|r| switched(r)).count();
    if count > 0 && !matches!(action, Action::Deploy) {
        return stay("");
    }
    // This run's switched service containers, newest first.
    let mut ours = Vec::new();
    for step in done.iter().rev() {
        let Step::Container(c) = step else { continue };
        let Ok(name) = docker::resolve(ctx.host, c).map(|r| r.spec.name) else {
            continue;
        };
        if switched_container(reports, &name) {
            ours.push((name, c));
        }
    }
    if ours.len() < count {
        return stay("");
    }
    // Each must have the container it replaced to go back to before any goes back.
    let look = StepCtx {
        plan: true,
        stop: ctx.stop.clone(),
        ..*ctx
    };
    for (name, c) in &ours {
        if let Err(e) = docker::revert(&look, c).await {
            return stay(&format!(" and {name} cannot go back ({e:#})"));
        }
    }
    let mut back: Vec<&str> = Vec::new();
    for (name, c) in &ours {
        match docker::revert(ctx, c).await {
            Ok(mut r) => {
                // (Unchanged: the run only started the container it found stopped.)
                if r.changed {
                    ctx.progress.println(&format!(
                        "{host}: container: switched {name} back: the {what} failed"
                    ));
                    r.summary = format!("{} because a later step failed", r.summary);
                    reports.push(r);
                    back.push(name);
                }
            }
            Err(e) => {
                let went = match back.is_empty() {
                    true => String::new(),
                    false => format!("; {} went back", back.join(", ")),
                };
                return stay(&format!(" and {name} could not go back ({e:#}){went}"));
            }
        }
    }
    for step in done.iter().rev() {
        let Step::Sync(s) = step else { continue };
        // (The path as sync reports it: spelled one way.)
        let Ok(path) = sync::target_paths(ctx.host, &s.to).map(|p| p.to) else {
            continue;
        };
        let path = path.as_str();
        let Some(report) = reports.iter().rev().find(|r| {
            r.step == "sync" && r.detail.get("path").and_then(|v| v.as_str()) == Some(path)
        }) else {
            continue;
        };
        let field = |a: &str, b: &str| {
            let d = &report.detail;
            d.get(a).or(d.get(b)).and_then(|v| v.as_str())
        };
        // A first release: nothing was live to switch back to, so it comes off.
        if report.changed && report.detail.get("before").is_some_and(|b| !b.is_null()) {
            match sync::withdraw(ctx, s, report).await {
                Ok(Some(mut r)) => {
                    ctx.progress.println(&format!(
                        "{host}: sync: took the first release off {path}: the {what} failed"
                    ));
                    r.summary = format!("{} because a later step failed", r.summary);
                    reports.push(r);
                }
                Ok(None) => ctx.progress.println(&format!(
                    "{host}: {path} stays on the new release: it was a directory ferry had not filled, \
                     which cannot be put back"
                )),
                Err(e) => ctx.progress.println(&format!(
                    "{host}: WARNING: cannot take the new release off {path}: {e:#}"
                )),
            }
            continue;
        }
        let Some(previous) = field("previous", "from") else {
            continue;
        };
        if !report.changed || field("release", "to") == Some(previous) {
            continue;
        }
        let previous = previous.to_string();
        match sync::rollback(ctx, s, Some(&previous)).await {
            Ok(mut r) => {
                ctx.progress.println(&format!(
                    "{host}: sync: switched back to release {previous}: the {what} failed"
                ));
                r.summary = format!("reverted to {previous} because a later step failed");
                reports.push(r);
            }
            Err(e) => ctx.progress.println(&format!(
                "{host}: WARNING: cannot switch {} back to release {previous}: {e:#}",
                s.to
            )),
        }
    }
}

/// The files release live at each sync target after a run (by path), and the last one reported:
/// a new release, a rollback's target, or (a sync that changed nothing) the release that stayed
/// live. The last word wins: a revert after a failed step comes after the sync it undid.
fn live_releases(reports: &[StepReport]) -> (BTreeMap<String, String>, Option<String>) {
    let field =
        |r: &StepReport, k: &str| r.detail.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let (mut by_path, mut last) = (BTreeMap::new(), None);
    for r in reports.iter().filter(|r| r.step == "sync") {
        // (A first release taken off again: nothing is live there.)
        if r.detail.get("withdrawn").is_some() {
            if let Some(path) = field(r, "path") {
                by_path.remove(&path);
            }
            last = None;
            continue;
        }
        let Some(release) = ["release", "to", "live"].iter().find_map(|k| field(r, k)) else {
            continue;
        };
        if let Some(path) = field(r, "path") {
            by_path.insert(path, release.clone());
        }
        last = Some(release);
    }
    (by_path, last)
}

/// Before a deploy that took over the lock of a run that ended unrecorded (killed, cut off): put
/// the host back on the last good run, as `ferry rollback` after such a run does. That run may
/// have left its files live beside containers a later step puts back (or its container half
/// switched), and this deploy, should it fail, switches back to what it found: that must be a
/// state the ledger knows. Nothing to go back to (no good run recorded): nothing done. An error
/// stops the deploy before its own steps.
async fn recover(
    ctx: &StepCtx<'_>,
    steps: &[Step],
    per_branch: bool,
    lost: &std::sync::Mutex<Option<String>>,
) -> (Vec<StepReport>, Option<String>) {
    let host = ctx.host.name();
    let target = match rollback_target(ctx, None, per_branch, true).await {
        Ok(Some(t)) => t,
        Ok(None) => return (Vec::new(), None),
        Err(e) => {
            ctx.progress.println(&format!(
                "{host}: warning: the run whose lock this one took over ended unrecorded, and \
                 there is no good run to put the host back on first ({e:#})"
            ));
            return (Vec::new(), None);
        }
    };
    let deploy = target.context();
    ctx.progress.println(&format!(
        "{host}: the run whose lock this one took over ended unrecorded: putting the host back on \
         release {} (ref {}, commit {}), the last good run, before this deploy",
        target.release,
        shell::quote_str(&target.ref_name),
        deploy.short_sha()
    ));
    let back = StepCtx {
        deploy: &deploy,
        release: &target.release,
        stop: ctx.stop.clone(),
        ..*ctx
    };
    let action = Action::Rollback(target.files_release.clone(), target.files_releases.clone());
    let (reports, error) = run_steps(&back, steps, &action, lost).await;
    let error = error.map(|e| {
        format!(
            "putting the host back on the last good run (release {}) before this deploy failed, \
             so the deploy did not run: {e}. Run the job again to deploy without going back \
             first (this run recorded the cut one), or `ferry rollback --to RELEASE`",
            target.release
        )
    });
    (reports, error)
}

/// The ledger's choice of what to roll back to on this host. In an environment whose root, sync
/// targets or container names depend on the ref (a review app per branch), every branch writes to
/// one ledger: only this ref's records count.
async fn rollback_target(
    ctx: &StepCtx<'_>,
    to: Option<&str>,
    per_branch: bool,
    cut: bool,
) -> anyhow::Result<Option<Record>> {
    let records: Vec<Record> = ledger::read(ctx.host, ctx.session)
        .await?
        .into_iter()
        .filter(|r| ours(ctx, r))
        .filter(|r| !per_branch || r.ref_slug == ctx.deploy.ref_slug)
        .collect();
    ledger::rollback_target(&records, to, cut)
        .map(|r| r.cloned())
        .map_err(|e| anyhow::anyhow!("{}: {e}", ctx.host.name()))
}

/// The commit of this ref's last good deploy on this host, from its ledger `records`.
fn last_good_commit(ctx: &StepCtx<'_>, records: &[Record]) -> Option<String> {
    records
        .iter()
        .rev()
        .find(|r| ours(ctx, r) && r.ref_name == ctx.deploy.ref_name && r.good())
        .map(|r| r.sha.clone())
}

/// A ledger record of this run's app and environment on this host (the ledger may hold others).
fn ours(ctx: &StepCtx<'_>, r: &Record) -> bool {
    r.app == ctx.app && r.env == ctx.env && r.host == ctx.host.name()
}

/// A per-branch run refused because another branch with its slug is on the host.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SlugClash(String);

/// In an environment whose paths or containers are named by the ref's slug (a review app per
/// branch), two branches with one slug (`fix/login`, `fix-login`) would share them: a deploy or
/// stop of one would replace or remove the other's. Refused while the other is on the host's
/// `records` and not stopped.
fn slug_shared(ctx: &StepCtx<'_>, action: &Action, records: &[Record]) -> anyhow::Result<()> {
    let me = ctx.deploy;
    // Per other branch with this slug: its last record, and whether it ever deployed (one that
    // never did, refused for this very clash say, has nothing there).
    let mut others: BTreeMap<&str, (&Record, bool)> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| ours(ctx, r) && r.ref_name != me.ref_name)
    {
        let slug = if r.ref_slug.is_empty() {
            crate::template::slug(&r.ref_name)
        } else {
            r.ref_slug.clone()
        };
        if slug == me.ref_slug {
            let good = others.get(r.ref_name.as_str()).is_some_and(|o| o.1) || r.good();
            others.insert(&r.ref_name, (r, good));
        }
    }
    match others
        .values()
        .find(|(r, good)| *good && !(r.action == "stop" && r.ok))
        .map(|(r, _)| *r)
    {
        None => Ok(()),
        Some(other) => Err(SlugClash(format!(
            "{host}: {me_ref} and {other_ref} have the same slug `{slug}`, so in environment {env} \
             they share paths and containers, and this {action} would replace or remove what \
             {other_ref} has there (its last {other_action}: release {release}). Stop it first \
             (`ferry stop --env {env} --ref {other_q}`), or use another branch name",
            host = ctx.host.name(),
            me_ref = shell::quote_str(&me.ref_name),
            other_ref = shell::quote_str(&other.ref_name),
            slug = me.ref_slug,
            env = ctx.env,
            action = if ctx.plan { "plan" } else { action.name() },
            other_action = other.action,
            release = other.release,
            other_q = shell::quote_str(&other.ref_name),
        ))
        .into()),
    }
}

async fn run_step(ctx: &StepCtx<'_>, step: &Step) -> anyhow::Result<Option<StepReport>> {
    Ok(Some(match step {
        Step::Sync(s) => sync::run(ctx, s).await?,
        Step::SyncRemove(s) => sync::remove(ctx, s).await?,
        Step::Run(r) => run_command(ctx, r).await?,
        other => docker::run(ctx, other).await?,
    }))
}

/// Rollback walks the deploy steps backwards in effect: files and the service container switch back;
/// one-shot steps (push, tag, run) have nothing to undo and are skipped.
async fn rollback_step(
    ctx: &StepCtx<'_>,
    step: &Step,
    to: Option<&str>,
    per_path: &BTreeMap<String, String>,
) -> anyhow::Result<Option<StepReport>> {
    match step {
        Step::Sync(s) => {
            let path = sync::target_paths(ctx.host, &s.to)?.to;
            let to = per_path.get(&path).map(String::as_str).or(to);
            Ok(Some(sync::rollback(ctx, s, to).await?))
        }
        Step::Container(c) => Ok(Some(docker::rollback(ctx, c).await?)),
        _ => Ok(None),
    }
}

/// A `run` step's secrets as `NAME=value` pairs for [`Session::run_watched`], read from the
/// controller's environment.
fn run_secrets(step: &RunStep) -> anyhow::Result<Vec<(String, String)>> {
    step.secret_env
        .iter()
        .map(|(name, var)| {
            let plain = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !plain {
                anyhow::bail!("run: secret_env name `{name}` is not a shell variable name (letters, digits, `_`)");
            }
            let value = crate::ci::secret_var(var).map_err(|why| {
                anyhow::anyhow!("run: secret_env {name} reads environment variable {var}, {why}; set it in the CI/CD variables")
            })?;
            if value.contains(['\n', '\r']) {
                anyhow::bail!("run: secret_env {name} (from {var}) contains a line break (a newline or carriage return), which ferry does not pass to commands");
            }
            Ok((name.clone(), value))
        })
        .collect()
}

/// The last lines of a failed `run` command's stdout shown beside the error.
const RUN_OUTPUT_LINES: usize = 50;

/// A `run` step's command for one host, its templates expanded.
fn command_argv(host: &Host, command: &Command) -> anyhow::Result<Vec<String>> {
    Ok(match command {
        Command::Argv(argv) => argv
            .iter()
            .map(|a| host.expand(a))
            .collect::<anyhow::Result<Vec<_>>>()?,
        Command::Shell(s) => vec!["sh".into(), "-c".into(), host.expand_shell(s)?],
    })
}

async fn run_command(ctx: &StepCtx<'_>, step: &RunStep) -> anyhow::Result<StepReport> {
    let argv = command_argv(ctx.host, &step.command)?;
    let cmd = shell::join_str(&argv);
    if ctx.plan {
        return Ok(StepReport {
            step: "run".into(),
            summary: format!("would run: {cmd}"),
            ..Default::default()
        });
    }
    let secrets = run_secrets(step)?;
    let timeout = step.timeout.unwrap_or(Duration::from_secs(600));
    // Outside GitLab (whose sections come whole, so that hosts do not interleave) and `--json`,
    // the command's lines are shown as they come (a long migration is not silent).
    let live = !ctx.style.gitlab && !ctx.style.json;
    let host = ctx.host.name();
    let masked = |text: &str| report::mask(text, secrets.iter().map(|(_, v)| v.as_str()));
    let show = |stream: crate::ssh::Stream, line: &[u8]| {
        let line = masked(&String::from_utf8_lossy(line));
        let mark = if stream == crate::ssh::Stream::Stderr {
            "stderr: "
        } else {
            ""
        };
        ctx.progress.println(&format!("{host}: {mark}{line}"));
    };
    // (Cut off, the step drops the command: its channel closes, and the host stops it.)
    let out = match ctx
        .session
        .run_watched(&argv, &secrets, Some(timeout), live.then_some(&show as _))
        .await
    {
        Err(SshError::CommandTimeout { .. }) => anyhow::bail!(
            "{}: `{cmd}` did not finish within {timeout:?} (the step's timeout); it was stopped",
            ctx.host.name()
        ),
        r => r?,
    };
    // Its output: stdout, then stderr (each line marked).
    let lines = |bytes: &[u8], mark: &str| -> Vec<String> {
        masked(&String::from_utf8_lossy(bytes))
            .lines()
            .map(|l| format!("{mark}{l}"))
            .collect()
    };
    let mut log = lines(&out.stdout, "");
    log.extend(lines(&out.stderr, "stderr: "));
    if !out.success() {
        let status = out.exit();
        // The error quotes the end of stderr (else of stdout): the rest of the output goes first
        // (unless it was shown as it came).
        if !live && out.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
            let stdout = lines(&out.stdout, "");
            for l in &stdout[stdout.len().saturating_sub(RUN_OUTPUT_LINES)..] {
                ctx.progress.println(&format!("{host}: {l}"));
            }
        }
        let tail = masked(&out.tail());
        anyhow::bail!(
            "`{cmd}` failed with {status}{}",
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        );
    }
    Ok(StepReport {
        step: "run".into(),
        changed: true,
        summary: format!("ran: {cmd}"),
        // (Shown already as it came; `--json` and GitLab get it here.)
        log: if live { Vec::new() } else { log },
        ..Default::default()
    })
}

/// Print the per-host summary and choose the exit code.
fn finish(g: &Global, plan: bool, reports: &[HostReport]) -> anyhow::Result<i32> {
    if g.json {
        crate::outln!("{}", serde_json::to_string_pretty(reports)?);
    } else {
        if plan {
            for r in reports {
                for s in &r.steps {
                    for line in &s.log {
                        crate::outln!("{}: {line}", r.host);
                    }
                    crate::outln!("{}: {}: {}", r.host, s.step, s.summary);
                }
            }
        }
        let rows: Vec<Vec<String>> = reports
            .iter()
            .map(|r| {
                let sent: u64 = r.steps.iter().map(|s| s.bytes_sent).sum();
                let files: u64 = r.steps.iter().map(|s| s.files_sent).sum();
                vec![
                    r.host.clone(),
                    r.env.clone(),
                    if r.ok { "ok".into() } else { "FAILED".into() },
                    files.to_string(),
                    report::human_bytes(sent),
                    format!("{:.1}s", r.seconds),
                    // (Its first line: the whole text, a container's logs too, is in the step's
                    // log above and in --json.)
                    r.error
                        .as_deref()
                        .map_or(String::new(), |e| match e.split_once('\n') {
                            Some((first, _)) => format!("{first} …"),
                            None => e.to_string(),
                        }),
                ]
            })
            .collect();
        crate::out!(
            "{}",
            report::table(
                &[
                    "HOST",
                    "ENV",
                    "RESULT",
                    "FILES SENT",
                    "SENT",
                    "TIME",
                    "ERROR"
                ],
                &rows
            )
        );
    }
    Ok(if reports.iter().all(|r| r.ok) { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_secrets_need_plain_names_and_are_masked() {
        let step = |name: &str| RunStep {
            command: Command::Shell("true".into()),
            timeout: None,
            secret_env: [(name.to_string(), "FERRY_TEST_UNSET_VAR".to_string())].into(),
        };
        for bad in ["A B", "1X", "X;rm", ""] {
            let e = run_secrets(&step(bad)).unwrap_err().to_string();
            assert!(e.contains("not a shell variable name"), "{bad}: {e}");
        }
        let e = run_secrets(&step("TOKEN")).unwrap_err().to_string();
        assert!(e.contains("FERRY_TEST_UNSET_VAR, which is not set"), "{e}");
    }
}
