//! `ferry status` and `ferry history`: what is live where, per branch, and the recent deploys.
//!
//! Every host is read at once: its ledger (every attempt, every branch, since the ledger lives under
//! the ref-independent state dir) and its live state (`sync::live` for each sync target and
//! `docker::live` for each container, expanded for each branch the ledger names). A live read that
//! fails shows as "unknown" with the reason. [`summarize`] is pure. It decides which branch is live
//! on each host and flags hosts that disagree, drift, or whose last attempt failed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::ci::{DeployContext, short_sha};
use crate::cli::{Global, Setup, Target, every_env};
use crate::inventory::{self, Host, Overrides};
use crate::ledger::{self, Record};
use crate::playbook::{Playbook, Step};
use crate::report;
use crate::ssh::Session;
use crate::{docker, shell, sync};

/// What one host said for one environment.
#[derive(Debug, Clone)]
pub struct HostView {
    pub host: String,
    /// This app's and environment's records, oldest first; `Err` when the host could not be read.
    pub records: Result<Vec<Record>, String>,
    /// Live state per ref (per-branch environments), or under `""` (one deployment per host).
    pub live: BTreeMap<String, Live>,
}

/// The live state read from a host (files and containers), reduced to what status shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Live {
    /// Ref and commit the live files or container say they came from.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    pub sha: Option<String>,
    pub release: Option<String>,
    /// The live release at each sync target (by path).
    pub files: BTreeMap<String, String>,
    /// Missing, stopped, unhealthy, drifted or unreadable things.
    pub notes: Vec<String>,
    /// The commit each service container says it runs (by name).
    #[serde(skip)]
    pub containers: Vec<(String, String)>,
    /// The sync targets and containers read: found, missing (nothing live at a target, no such
    /// container), and those that could not be read.
    #[serde(skip)]
    pub found: usize,
    #[serde(skip)]
    pub missing: usize,
    #[serde(skip)]
    pub unread: usize,
}

impl Live {
    /// Everything read is missing: removed outside ferry (a `ferry stop` is in the ledger).
    fn gone(&self) -> bool {
        self.missing > 0 && self.found == 0 && self.unread == 0
    }
}

/// One line of a branch's table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub env: String,
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub host: String,
    /// This branch is what the host serves in this environment.
    pub live: bool,
    /// `live`, `replaced by REF`, `stopped`, `gone` (per branch: nothing it deployed is on the
    /// host, and no `ferry stop` removed it), `never deployed ok`, `unknown`.
    pub state: String,
    /// The release and commit of this branch's last good deploy on the host.
    pub release: Option<String>,
    pub sha: Option<String>,
    /// The files release that deploy left live when it changed no files (an earlier one's), if
    /// every sync target has it.
    pub files_release: Option<String>,
    /// Each sync target (path) whose live files release is not that deploy's own (a target whose
    /// files did not change keeps an earlier one).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub files_releases: BTreeMap<String, String>,
    /// The last attempt: `deploy ok`, `deploy FAILED`, `stop ok`, ...
    pub result: String,
    pub last_attempt_at: u64,
    pub error: Option<String>,
    pub notes: Vec<String>,
}

/// One environment's picture.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EnvStatus {
    pub env: String,
    pub rows: Vec<Row>,
    /// Problems across hosts (disagreement, unreadable hosts).
    pub flags: Vec<String>,
}

/// Build an environment's status from what its hosts said. `per_branch`: each ref has its own
/// deployment (review apps), so several can be live at once.
pub fn summarize(env: &str, per_branch: bool, hosts: &[HostView]) -> EnvStatus {
    let mut st = EnvStatus {
        env: env.into(),
        ..Default::default()
    };
    // Per host: which ref is live (shared environments).
    let mut live_on: BTreeMap<String, (String, String)> = BTreeMap::new();
    for h in hosts {
        let records = match &h.records {
            Ok(r) => r,
            Err(e) => {
                st.flags
                    .push(format!("{}: cannot read the ledger: {e}", h.host));
                continue;
            }
        };
        let refs: BTreeSet<&str> = records.iter().map(|r| r.ref_name.as_str()).collect();
        // The last good record of the host (any ref): what a shared environment serves.
        let last_good = records.iter().rev().find(|r| r.good());
        let live_shared = h.live.get("");
        for r in refs {
            let mine: Vec<&Record> = records.iter().filter(|x| x.ref_name == r).collect();
            let last = *mine.last().expect("ref came from the records");
            let good = mine.iter().rev().find(|x| x.good()).copied();
            let stopped = last.action == "stop" && last.ok;
            let live_read = if per_branch {
                h.live.get(r)
            } else {
                live_shared
            };
            let mut notes = Vec::new();
            let (live, state) = if stopped {
                (false, "stopped".to_string())
            } else if good.is_none() {
                (false, "never deployed ok".to_string())
            } else if per_branch {
                match live_read {
                    Some(l) if l.gone() => {
                        notes.extend(l.notes.iter().cloned());
                        notes.push(
                            "removed outside ferry: nothing this branch deployed is on the host"
                                .into(),
                        );
                        (false, "gone".to_string())
                    }
                    _ => (true, "live".to_string()),
                }
            } else {
                // The live reading names the ref that made the live files; the host's last good
                // record wins when it left those files live (a deploy of the same build by
                // another ref keeps them). The ledger alone when nothing is read.
                let kept_by_last = last_good.filter(|g| {
                    live_read.is_some_and(|l| {
                        l.release
                            .as_ref()
                            .is_some_and(|lr| g.release == *lr || g.left_files(lr))
                    })
                });
                let live_ref = kept_by_last
                    .map(|g| g.ref_name.clone())
                    .or_else(|| live_read.and_then(|l| l.ref_name.clone()))
                    .or_else(|| last_good.map(|g| g.ref_name.clone()));
                match live_ref {
                    Some(lr) if lr == r => (true, "live".to_string()),
                    Some(lr) => (false, format!("replaced by {}", shell::quote_str(&lr))),
                    None => (false, "unknown".to_string()),
                }
            };
            if live {
                // (The commit the drift note below names, if any: not named twice.)
                let mut drifted = None;
                if let Some(l) = live_read {
                    notes.extend(l.notes.iter().cloned());
                    // (A deploy that changed no files keeps the files release of an earlier
                    // commit: the ledger names it, and the deploy that made it has the commit
                    // the host runs; or that deploy was cut off, and recorded by the run that
                    // took its lock over, without a release. That is no drift.)
                    let made =
                        |x: &Record, lr: &str| x.release == lr || (!x.ok && x.release.is_empty());
                    let kept = |g: &Record| {
                        l.release.as_ref().is_some_and(|lr| {
                            g.left_files(lr)
                                && records
                                    .iter()
                                    .any(|x| made(x, lr) && l.sha.as_ref() == Some(&x.sha))
                        })
                    };
                    if let (Some(ls), Some(g)) = (&l.sha, good)
                        && ls != &g.sha
                        && !kept(g)
                    {
                        notes.push(format!(
                            "drift: the host runs commit {} but the ledger's last good deploy is {}",
                            short_sha(ls),
                            short_sha(&g.sha)
                        ));
                        drifted = Some(ls);
                    }
                }
                if let Some(g) = good {
                    // A service container of a commit no good run recorded: a run cut off after
                    // it started the container (a no-op run keeps an earlier good run's).
                    for (name, sha) in live_read.map(|l| &l.containers).into_iter().flatten() {
                        if sha != &g.sha
                            && drifted != Some(sha)
                            && !records.iter().any(|x| x.good() && &x.sha == sha)
                        {
                            notes.push(format!(
                                "container {name} runs commit {}, which no successful deploy \
                                 recorded (a run cut off while it switched?); the next deploy \
                                 puts it right",
                                short_sha(sha)
                            ));
                        }
                    }
                    live_on.insert(h.host.clone(), (r.to_string(), g.sha.clone()));
                    // Each sync target against the release that deploy left there.
                    for (path, rel) in live_read.map(|l| &l.files).into_iter().flatten() {
                        if let Some(want) = g.files_releases.get(path)
                            && want != rel
                        {
                            notes.push(format!(
                                "files at {path}: release {rel} is live, but the ledger's last \
                                 good run left {want} there"
                            ));
                        }
                    }
                }
            }
            // (A deploy that changed no files keeps an older files release: name it, per target
            // when the targets differ.)
            let files_releases: BTreeMap<String, String> = good
                .map(|g| {
                    g.files_releases
                        .iter()
                        .filter(|(_, rel)| **rel != g.release)
                        .map(|(p, rel)| (p.clone(), rel.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let files_release = good
                .and_then(|g| match g.files_releases.is_empty() {
                    // (A record from before ferry kept one per target.)
                    true => g.files_release.clone(),
                    false => {
                        let mut each = g.files_releases.values();
                        let first = each.next()?;
                        each.all(|r| r == first).then(|| first.clone())
                    }
                })
                .filter(|f| good.is_some_and(|g| *f != g.release));
            if !last.ok {
                notes.push(format!(
                    "last attempt failed{}",
                    if live {
                        "; the release shown is the last good run's"
                    } else {
                        ""
                    }
                ));
            }
            st.rows.push(Row {
                env: env.into(),
                ref_name: r.into(),
                host: h.host.clone(),
                live,
                state,
                release: good.map(|g| g.release.clone()),
                sha: good.map(|g| g.sha.clone()),
                files_release,
                files_releases,
                result: format!("{} {}", last.action, if last.ok { "ok" } else { "FAILED" }),
                last_attempt_at: last.started_at,
                error: last.error.clone(),
                notes,
            });
        }
    }
    // Hosts of one deployment that serve different commits.
    if !per_branch {
        let distinct: BTreeSet<&(String, String)> = live_on.values().collect();
        if distinct.len() > 1 {
            let who: Vec<String> = live_on
                .iter()
                .map(|(h, (r, s))| format!("{h} on {} {}", shell::quote_str(r), short_sha(s)))
                .collect();
            st.flags
                .push(format!("{env}: hosts disagree: {}", who.join(", ")));
        }
    } else {
        let mut by_ref: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for row in st.rows.iter().filter(|r| r.live) {
            by_ref
                .entry(&row.ref_name)
                .or_default()
                .insert(row.sha.as_deref().unwrap_or(""));
        }
        for (r, shas) in by_ref {
            if shas.len() > 1 {
                st.flags.push(format!(
                    "{env} {}: hosts disagree: commits {}",
                    shell::quote_str(r),
                    shas.iter()
                        .map(|s| short_sha(s))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    st.rows.sort_by(|a, b| {
        b.last_attempt_at
            .cmp(&a.last_attempt_at)
            .then(a.host.cmp(&b.host))
    });
    st
}

/// The live-state steps of an environment: sync targets and containers.
fn live_steps(pb: &Playbook, env: &str) -> Vec<Step> {
    pb.environments[env]
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Sync(_) | Step::Container(_) | Step::Accessory(_)))
        .cloned()
        .collect()
}

/// The host as a given ref's deploy saw it (its variables, root and paths).
fn host_for(
    pb: &Playbook,
    env: &str,
    ctx: &DeployContext,
    limit: &[String],
    name: &str,
) -> anyhow::Result<Host> {
    let ov = Overrides {
        limit: limit.to_vec(),
        ..Default::default()
    };
    let (_, hosts) = inventory::resolve(pb, env, &ctx.vars(), &ov)?;
    hosts
        .into_iter()
        .find(|h| h.name() == name)
        .ok_or_else(|| anyhow::anyhow!("host {name} is not in environment {env} for this ref"))
}

/// Whether each ref gets its own deployment: the root, a sync target or a container name changes
/// with the ref.
pub fn is_per_branch(pb: &Playbook, env: &str) -> bool {
    let a = DeployContext::placeholder();
    let mut b = a.clone();
    b.ref_name.push_str("-other");
    b.ref_slug.push_str("-other");
    let ov = Overrides::default();
    let (Ok((_, ha)), Ok((_, hb))) = (
        inventory::resolve(pb, env, &a.vars(), &ov),
        inventory::resolve(pb, env, &b.vars(), &ov),
    ) else {
        return false;
    };
    let (Some(ha), Some(hb)) = (ha.first(), hb.first()) else {
        return false;
    };
    if ha.root != hb.root {
        return true;
    }
    pb.environments[env].steps.iter().any(|s| match s {
        Step::Sync(s) => ha.path(&s.to).ok() != hb.path(&s.to).ok(),
        Step::Container(c) => ha.expand(&c.name).ok() != hb.expand(&c.name).ok(),
        _ => false,
    })
}

/// Read the live files and containers of `steps` on `host`, as `ctx`'s deploy named them.
async fn read_live(host: &Host, session: &Session, steps: &[Step]) -> Live {
    let mut live = Live::default();
    for step in steps {
        match step {
            Step::Sync(s) => match sync::live(host, session, s).await {
                Ok(l) => {
                    match &l.release {
                        Some(rel) => {
                            live.found += 1;
                            live.files.insert(l.path.clone(), rel.clone());
                            live.release.get_or_insert(rel.clone());
                            if let Some(r) = &l.ref_name {
                                live.ref_name.get_or_insert(r.clone());
                            }
                            if let Some(s) = &l.sha {
                                live.sha.get_or_insert(s.clone());
                            }
                        }
                        None => {
                            live.missing += 1;
                            live.notes.push(format!("nothing live at {}", l.path))
                        }
                    }
                    if let Some(d) = l.drift {
                        live.notes.push(format!("drift at {}: {d}", l.path));
                    }
                }
                Err(e) => {
                    live.unread += 1;
                    live.notes
                        .push(format!("files at {}: unknown ({e:#})", s.to))
                }
            },
            Step::Container(c) | Step::Accessory(c) => {
                let service = matches!(step, Step::Container(_));
                let read = docker::live(host, session, c).await;
                match &read {
                    Ok(l) if !l.exists => live.missing += 1,
                    Ok(_) => live.found += 1,
                    Err(_) => live.unread += 1,
                }
                if let Ok(l) = &read
                    && l.aside
                {
                    live.notes.push(format!(
                        "container {n}.ferry-aside is there: a replace of {n} was cut off; the \
                         next deploy puts back the one it set aside or keeps the new one",
                        n = l.name
                    ));
                }
                match read {
                    Ok(l) if !l.exists => {
                        live.notes.push(format!("container {} is missing", l.name))
                    }
                    Ok(l) if !l.running => live
                        .notes
                        .push(format!("container {} is not running", l.name)),
                    Ok(l) => {
                        if let Some(h) = l.health.as_deref().filter(|h| *h != "healthy") {
                            live.notes.push(format!("container {} is {h}", l.name));
                        }
                        if service {
                            if let Some(r) = l.ref_name {
                                live.ref_name.get_or_insert(r);
                            }
                            if let Some(s) = l.sha {
                                live.sha.get_or_insert(s.clone());
                                live.containers.push((l.name.clone(), s));
                            }
                        }
                    }
                    Err(e) => live
                        .notes
                        .push(format!("container {}: unknown ({e:#})", c.name)),
                }
            }
            _ => {}
        }
    }
    live
}

/// Read one environment from every host at once.
async fn gather(
    g: &Global,
    pb: &Playbook,
    env: &str,
    with_live: bool,
) -> anyhow::Result<(bool, Vec<HostView>)> {
    let setup = Setup::with_playbook(g, pb.clone(), env, Some(&DeployContext::placeholder()))?;
    let per_branch = is_per_branch(pb, env);
    let steps = if with_live {
        live_steps(pb, env)
    } else {
        vec![]
    };
    let outcomes = crate::fleet::run(
        &setup.connector,
        &setup.hosts,
        setup.settings.forks,
        |host, session| {
            let steps = &steps;
            async move {
                let all = ledger::read(&host, &session).await;
                let records: Vec<Record> = match all {
                    Ok(r) => r
                        .into_iter()
                        .filter(|r| r.app == pb.app && r.env == env && r.host == host.name())
                        .collect(),
                    Err(e) => {
                        session.close().await;
                        return Err(e);
                    }
                };
                let mut live = BTreeMap::new();
                if !steps.is_empty() {
                    if per_branch {
                        let mut seen = BTreeSet::new();
                        for r in records.iter().rev() {
                            if !seen.insert(r.ref_name.clone()) {
                                continue;
                            }
                            let l = match host_for(pb, env, &r.context(), &g.limit, host.name()) {
                                Ok(h) => read_live(&h, &session, steps).await,
                                Err(e) => Live {
                                    notes: vec![format!("unknown ({e:#})")],
                                    ..Default::default()
                                },
                            };
                            live.insert(r.ref_name.clone(), l);
                        }
                    } else {
                        // Names may still use ref variables (image tags): expand with the last deploy's.
                        let h = match records.last() {
                            Some(r) => host_for(pb, env, &r.context(), &g.limit, host.name())
                                .unwrap_or(host.clone()),
                            None => host.clone(),
                        };
                        live.insert(String::new(), read_live(&h, &session, steps).await);
                    }
                }
                session.close().await;
                Ok((records, live))
            }
        },
    )
    .await;
    let views = outcomes
        .into_iter()
        .map(|o| match o.result {
            Ok((records, live)) => HostView {
                host: o.host,
                records: Ok(records),
                live,
            },
            Err(e) => HostView {
                host: o.host,
                records: Err(format!("{e:#}")),
                live: BTreeMap::new(),
            },
        })
        .collect();
    Ok((per_branch, views))
}

fn age(unix: u64) -> String {
    report::human_duration(std::time::Duration::from_secs(
        report::unix_now().saturating_sub(unix),
    )) + " ago"
}

/// `ferry status`.
pub async fn cli_status(
    g: &Global,
    target: &Target,
    ref_name: Option<&str>,
) -> anyhow::Result<i32> {
    let pb = crate::cli::load_playbook(&target.playbook)?;
    let envs = every_env(g, &pb, target)?;
    // Every environment at once; within each, every host at once.
    let gathered = futures::future::join_all(envs.iter().map(|e| gather(g, &pb, e, true))).await;
    let mut statuses = Vec::new();
    let mut readable = true;
    for (env, r) in envs.iter().zip(gathered) {
        let (per_branch, views) = r?;
        readable &= views.iter().all(|v| v.records.is_ok());
        let mut st = summarize(env, per_branch, &views);
        if let Some(want) = ref_name {
            st.rows.retain(|r| r.ref_name == want);
        }
        statuses.push(st);
    }
    if g.json {
        crate::outln!("{}", serde_json::to_string_pretty(&statuses)?);
    } else {
        crate::out!("{}", render(&statuses));
    }
    Ok(if readable { 0 } else { 1 })
}

/// The human view: a table per branch (most recent first), then the flags.
pub fn render(statuses: &[EnvStatus]) -> String {
    let mut branches: Vec<(&str, u64)> = Vec::new();
    for st in statuses {
        for r in &st.rows {
            match branches.iter_mut().find(|(b, _)| *b == r.ref_name) {
                Some((_, t)) => *t = (*t).max(r.last_attempt_at),
                None => branches.push((&r.ref_name, r.last_attempt_at)),
            }
        }
    }
    branches.sort_by_key(|b| std::cmp::Reverse(b.1));
    let mut out = String::new();
    if branches.is_empty() {
        // (Hosts that could not be read are listed below: their deploys are not known.)
        let unread = statuses.iter().any(|s| !s.flags.is_empty());
        out.push_str(match unread {
            false => "no deploys recorded\n",
            true => "no deploys found on the hosts that could be read\n",
        });
    }
    for (b, _) in &branches {
        out.push_str(&format!(
            "\n{}\n",
            report::escape_controls(&shell::quote_str(b))
        ));
        let rows: Vec<Vec<String>> = statuses
            .iter()
            .flat_map(|st| st.rows.iter())
            .filter(|r| r.ref_name == *b)
            .map(|r| {
                vec![
                    r.env.clone(),
                    r.host.clone(),
                    r.state.clone(),
                    r.release.clone().unwrap_or_else(|| "-".into()),
                    r.sha.as_deref().map(short_sha).unwrap_or("-").to_string(),
                    r.result.clone(),
                    age(r.last_attempt_at),
                    files_note(r)
                        .into_iter()
                        .chain(r.notes.iter().cloned())
                        .collect::<Vec<_>>()
                        .join("; "),
                ]
            })
            .collect();
        out.push_str(&report::table(
            &[
                "ENV",
                "HOST",
                "STATE",
                "RELEASE",
                "COMMIT",
                "LAST ATTEMPT",
                "AGE",
                "NOTES",
            ],
            &rows,
        ));
    }
    let flags: Vec<&String> = statuses.iter().flat_map(|s| s.flags.iter()).collect();
    let failed: Vec<&Row> = statuses
        .iter()
        .flat_map(|s| s.rows.iter())
        .filter(|r| !r.notes.is_empty())
        .collect();
    if !flags.is_empty() || !failed.is_empty() {
        out.push_str("\nattention:\n");
        for f in flags {
            out.push_str(&format!("  {}\n", report::escape_controls(f)));
        }
        for r in failed {
            let line = format!(
                "  {} {} on {}: {}{}",
                r.env,
                shell::quote_str(&r.ref_name),
                r.host,
                r.notes.join("; "),
                r.error
                    .as_deref()
                    .map(|e| format!(" ({})", e.lines().next().unwrap_or("")))
                    .unwrap_or_default()
            );
            out.push_str(&report::escape_controls(&line));
            out.push('\n');
        }
    }
    out
}

/// The files releases a row's deploy left live that are not its own: one, or one per target.
fn files_note(r: &Row) -> Option<String> {
    if let Some(f) = &r.files_release {
        return Some(format!("files: release {f}"));
    }
    let each: Vec<String> = r
        .files_releases
        .iter()
        .map(|(path, rel)| format!("files at {path}: release {rel}"))
        .collect();
    (!each.is_empty()).then(|| each.join("; "))
}

/// `ferry history`.
pub async fn cli_history(
    g: &Global,
    target: &Target,
    ref_name: Option<&str>,
    n: usize,
) -> anyhow::Result<i32> {
    let pb = crate::cli::load_playbook(&target.playbook)?;
    let envs = every_env(g, &pb, target)?;
    let gathered = futures::future::join_all(envs.iter().map(|e| gather(g, &pb, e, false))).await;
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for r in gathered {
        for v in r?.1 {
            match v.records {
                Ok(rs) => records.extend(rs),
                Err(e) => errors.push(format!("{}: {e}", v.host)),
            }
        }
    }
    records.retain(|r| ref_name.is_none_or(|want| r.ref_name == want));
    // Newest first; within one second, later in the ledger is newer.
    let mut records: Vec<(usize, Record)> = records.into_iter().enumerate().collect();
    records.sort_by(|(ia, a), (ib, b)| b.started_at.cmp(&a.started_at).then(ib.cmp(ia)));
    let mut records: Vec<Record> = records.into_iter().map(|(_, r)| r).collect();
    records.truncate(n);
    if g.json {
        crate::outln!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        let rows: Vec<Vec<String>> = records
            .iter()
            .map(|r| {
                vec![
                    report::utc_time(r.started_at),
                    r.env.clone(),
                    shell::quote_str(&r.ref_name),
                    short_sha(&r.sha).to_string(),
                    r.action.clone(),
                    r.host.clone(),
                    if r.ok { "ok".into() } else { "FAILED".into() },
                    r.release.clone(),
                    format!("{:.1}s", r.seconds),
                    report::human_bytes(r.bytes_sent),
                    r.user.clone(),
                ]
            })
            .collect();
        crate::out!(
            "{}",
            report::table(
                &[
                    "WHEN", "ENV", "REF", "COMMIT", "ACTION", "HOST", "RESULT", "RELEASE", "TOOK",
                    "SENT", "BY"
                ],
                &rows
            )
        );
    }
    for e in &errors {
        crate::errln!("warning: cannot read the ledger of {e}");
    }
    Ok(if errors.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(host: &str, r: &str, sha: &str, ok: bool, at: u64, action: &str) -> Record {
        Record {
            version: ledger::VERSION,
            app: "shop".into(),
            env: "staging".into(),
            host: host.into(),
            ref_name: r.into(),
            is_tag: false,
            ref_slug: crate::template::slug(r),
            sha: sha.into(),
            pipeline_id: None,
            job_url: None,
            release: format!("rel-{at}"),
            files_release: None,
            files_releases: Default::default(),
            action: action.into(),
            ok,
            error: (!ok).then(|| "step 1 (run): boom".into()),
            steps: vec![],
            started_at: at,
            seconds: 1.0,
            bytes_sent: 0,
            files_sent: 0,
            user: "alice".into(),
            controller: "runner".into(),
        }
    }

    fn view(host: &str, records: Vec<Record>) -> HostView {
        HostView {
            host: host.into(),
            records: Ok(records),
            live: BTreeMap::new(),
        }
    }

    #[test]
    fn shared_environment_live_ref_replacement_and_disagreement() {
        let web1 = view(
            "web1",
            vec![
                rec("web1", "release-1", "aaaa", true, 10, "deploy"),
                rec("web1", "release-2", "bbbb", true, 20, "deploy"),
            ],
        );
        let web2 = view(
            "web2",
            vec![rec("web2", "release-1", "aaaa", true, 10, "deploy")],
        );
        let st = summarize("staging", false, &[web1, web2]);
        let row = |h: &str, r: &str| {
            st.rows
                .iter()
                .find(|x| x.host == h && x.ref_name == r)
                .unwrap()
                .clone()
        };
        assert_eq!(row("web1", "release-2").state, "live");
        assert_eq!(row("web1", "release-1").state, "replaced by release-2");
        assert!(row("web2", "release-1").live);
        assert_eq!(st.flags.len(), 1, "{:?}", st.flags);
        assert!(st.flags[0].contains("hosts disagree"), "{:?}", st.flags);
        assert!(
            st.flags[0].contains("web2 on release-1 aaaa"),
            "{:?}",
            st.flags
        );
        // Most recent first.
        assert_eq!(st.rows[0].ref_name, "release-2");
    }

    #[test]
    fn a_failed_last_attempt_keeps_the_older_release_live_and_is_flagged() {
        let web1 = view(
            "web1",
            vec![
                rec("web1", "release-1", "aaaa", true, 10, "deploy"),
                rec("web1", "release-1", "cccc", false, 30, "deploy"),
            ],
        );
        let st = summarize("staging", false, &[web1]);
        assert_eq!(st.rows.len(), 1);
        let r = &st.rows[0];
        assert!(r.live);
        assert_eq!(r.sha.as_deref(), Some("aaaa"));
        assert_eq!(r.result, "deploy FAILED");
        assert!(r.notes[0].contains("last attempt failed"), "{:?}", r.notes);
        assert!(st.flags.is_empty());
    }

    #[test]
    fn a_deploy_that_changed_no_files_names_the_files_release() {
        let mut noop = rec("web1", "main", "aaaa", true, 20, "deploy");
        noop.files_release = Some("rel-10".into());
        let web1 = view(
            "web1",
            vec![rec("web1", "main", "aaaa", true, 10, "deploy"), noop],
        );
        let st = summarize("staging", false, &[web1]);
        let r = &st.rows[0];
        assert_eq!(r.release.as_deref(), Some("rel-20"));
        assert_eq!(r.files_release.as_deref(), Some("rel-10"));
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        assert!(render(std::slice::from_ref(&st)).contains("files: release rel-10"));
    }

    #[test]
    fn targets_on_different_files_releases_are_named_each() {
        let mut redeploy = rec("web1", "main", "aaaa", true, 20, "deploy");
        redeploy.files_release = Some("rel-10".into());
        redeploy.files_releases = [("/www/a", "rel-20"), ("/www/b", "rel-10")]
            .map(|(p, r)| (p.to_string(), r.to_string()))
            .into();
        let web1 = view(
            "web1",
            vec![
                rec("web1", "main", "aaaa", true, 10, "deploy"),
                redeploy.clone(),
            ],
        );
        let st = summarize("staging", false, &[web1]);
        let r = &st.rows[0];
        assert_eq!(r.files_release, None);
        assert_eq!(
            r.files_releases,
            [("/www/b".to_string(), "rel-10".to_string())].into()
        );
        let shown = render(std::slice::from_ref(&st));
        assert!(shown.contains("files at /www/b: release rel-10"), "{shown}");
        assert!(!shown.contains("files: release"), "{shown}");
        // Every target kept the same earlier release: one name.
        redeploy
            .files_releases
            .insert("/www/a".into(), "rel-10".into());
        let web1 = view(
            "web1",
            vec![rec("web1", "main", "aaaa", true, 10, "deploy"), redeploy],
        );
        let st = summarize("staging", false, &[web1]);
        assert_eq!(st.rows[0].files_release.as_deref(), Some("rel-10"));
        assert!(render(&[st]).contains("files: release rel-10"));
    }

    #[test]
    fn files_kept_from_an_earlier_commit_are_no_drift() {
        let mut noop = rec("web1", "main", "bbbb", true, 20, "deploy");
        noop.files_release = Some("rel-10".into());
        let mut web1 = view(
            "web1",
            vec![rec("web1", "main", "aaaa", true, 10, "deploy"), noop],
        );
        let live = |release: &str| Live {
            ref_name: Some("main".into()),
            sha: Some("aaaa".into()),
            release: Some(release.into()),
            ..Default::default()
        };
        web1.live.insert(String::new(), live("rel-10"));
        let st = summarize("staging", false, std::slice::from_ref(&web1));
        assert!(st.rows[0].notes.is_empty(), "{:?}", st.rows[0].notes);
        assert!(!render(&[st]).contains("attention"));
        // The files the ledger says, but another commit than the deploy that made them: drift
        // (a container started by hand, say).
        let mut other = live("rel-10");
        other.sha = Some("cccc".into());
        web1.live.insert(String::new(), other);
        let st = summarize("staging", false, std::slice::from_ref(&web1));
        assert!(
            st.rows[0].notes[0].starts_with("drift: the host runs commit"),
            "{:?}",
            st.rows[0].notes
        );
        // Files a cut-off run made (its record, written by the run that took its lock over,
        // names no release), kept by the good run after it: no drift.
        let mut cut = rec("web1", "main", "cccc", false, 15, "interrupted");
        cut.release = String::new();
        web1.records.as_mut().unwrap().insert(1, cut);
        let st = summarize("staging", false, std::slice::from_ref(&web1));
        assert!(st.rows[0].notes.is_empty(), "{:?}", st.rows[0].notes);
        web1.records.as_mut().unwrap().remove(1);
        // Other files than the ledger says: drift.
        web1.live.insert(String::new(), live("rel-5"));
        let st = summarize("staging", false, &[web1]);
        assert!(
            st.rows[0].notes[0].starts_with("drift: the host runs commit"),
            "{:?}",
            st.rows[0].notes
        );
    }

    #[test]
    fn a_container_of_a_commit_no_good_run_recorded_is_flagged() {
        let mut web1 = view(
            "web1",
            vec![
                rec("web1", "main", "aaaa", true, 10, "deploy"),
                rec("web1", "main", "bbbb", true, 20, "deploy"),
            ],
        );
        // The files of the last good run; the container of a run cut off while it switched.
        let live = |container: &str| Live {
            ref_name: Some("main".into()),
            sha: Some("bbbb".into()),
            release: Some("rel-20".into()),
            containers: vec![("app".into(), container.into())],
            ..Default::default()
        };
        web1.live.insert(String::new(), live("cccc"));
        let st = summarize("staging", false, std::slice::from_ref(&web1));
        assert!(
            st.rows[0].notes[0].starts_with("container app runs commit cccc, which no successful"),
            "{:?}",
            st.rows[0].notes
        );
        // A container an earlier good run started (a later run left it as it was): no note.
        web1.live.insert(String::new(), live("aaaa"));
        let st = summarize("staging", false, &[web1]);
        assert!(st.rows[0].notes.is_empty(), "{:?}", st.rows[0].notes);
    }

    #[test]
    fn per_branch_environments_stop_and_drift() {
        let mut web1 = view(
            "web1",
            vec![
                rec("web1", "feature/a", "aaaa", true, 10, "deploy"),
                rec("web1", "feature/b", "bbbb", true, 20, "deploy"),
                rec("web1", "feature/a", "aaaa", true, 30, "stop"),
                rec("web1", "feature/c", "cccc", false, 40, "deploy"),
                rec("web1", "feature/d", "dddd", true, 50, "deploy"),
                rec("web1", "feature/e", "eeee", true, 60, "deploy"),
            ],
        );
        web1.live.insert(
            "feature/b".into(),
            Live {
                sha: Some("9999".into()),
                notes: vec!["container review-b is not running".into()],
                found: 2,
                ..Default::default()
            },
        );
        // Removed by hand: its files and container gone. Half gone, or unreadable: still live.
        let read = |found, missing, unread| Live {
            notes: vec!["nothing live at /srv/review/d".into()],
            found,
            missing,
            unread,
            ..Default::default()
        };
        web1.live.insert("feature/d".into(), read(0, 2, 0));
        let mut half = web1.clone();
        half.live.insert("feature/d".into(), read(1, 1, 0));
        let mut unread = web1.clone();
        unread.live.insert("feature/d".into(), read(0, 1, 1));
        for v in [half, unread] {
            let st = summarize("review", true, &[v]);
            let d = st.rows.iter().find(|x| x.ref_name == "feature/d").unwrap();
            assert_eq!((d.live, d.state.as_str()), (true, "live"), "{d:?}");
        }
        let st = summarize("review", true, &[web1]);
        let row = |r: &str| st.rows.iter().find(|x| x.ref_name == r).unwrap().clone();
        assert_eq!(row("feature/a").state, "stopped");
        assert_eq!(row("feature/a").result, "stop ok");
        let b = row("feature/b");
        assert_eq!(b.state, "live");
        assert!(
            b.notes.iter().any(|n| n.contains("not running")),
            "{:?}",
            b.notes
        );
        assert!(
            b.notes.iter().any(|n| n.starts_with("drift")),
            "{:?}",
            b.notes
        );
        assert_eq!(row("feature/c").state, "never deployed ok");
        let d = row("feature/d");
        assert_eq!((d.live, d.state.as_str()), (false, "gone"), "{d:?}");
        assert!(
            d.notes[0] == "nothing live at /srv/review/d"
                && d.notes[1].starts_with("removed outside ferry"),
            "{:?}",
            d.notes
        );
        // (Nothing read: the ledger alone says live.)
        assert_eq!(row("feature/e").state, "live");
        assert!(st.flags.is_empty(), "{:?}", st.flags);
    }

    #[test]
    fn unreadable_hosts_are_flagged_and_rendering_quotes_refs() {
        let bad = HostView {
            host: "web9".into(),
            records: Err("connection refused".into()),
            live: BTreeMap::new(),
        };
        let good = view(
            "web1",
            vec![rec(
                "web1",
                "release-$(touch /tmp/pwned)",
                "aaaa",
                true,
                10,
                "deploy",
            )],
        );
        let st = summarize("staging", false, &[bad, good]);
        assert!(st.flags[0].contains("web9: cannot read the ledger"));
        let text = render(&[st]);
        assert!(text.contains("'release-$(touch /tmp/pwned)'"), "{text}");
        assert!(text.contains("attention:"), "{text}");
        // No host could be read: that is not "no deploys".
        let only_bad = HostView {
            host: "web9".into(),
            records: Err("connection refused".into()),
            live: BTreeMap::new(),
        };
        let text = render(&[summarize("staging", false, &[only_bad])]);
        assert!(
            !text.contains("no deploys recorded") && text.contains("could be read"),
            "{text}"
        );
    }
}
