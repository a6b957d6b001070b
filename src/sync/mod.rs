//! Sync: ship a local build directory to hosts by content-hash diff, into atomic releases.
//!
//! A deploy is one exec per host ([`remote::DEPLOY`]). It first reports what the host has: the
//! target's state, releases and their metadata, the live manifest, the names of stored objects, and
//! which objects were edited since they were placed (a plan reads the same with
//! [`remote::INVENTORY`], changing nothing). The pure [`diff`] decides what is missing. Then one
//! tar stream ([`archive`], gzip'd but for incompressible files and, in a bulk transfer, files of
//! 8 KiB or more) into the same exec carries
//! the missing objects and the new release tree as hard links; the script unpacks it, checks its
//! trailer, names the release and renames a new symlink over `to`. Nothing the live release uses
//! is ever written: new content arrives under new names, and objects edited on the host are
//! unlinked and re-sent. A host with nothing stored yet needs no hashes to know what to send:
//! its stream starts at once and hashes each file as it reads it (the tree is read once).
//!
//! What is atomic: a reader of `to` sees the old tree or the new one, never a mix (one `rename(2)`
//! of a symlink, also for rollback). Not atomic: `adopt: true` moves the existing directory aside
//! and then renames the link in, so `to` is briefly missing, once. An interrupted deploy (cut
//! connection, killed controller, full disk) leaves the live release as it was; the next deploy
//! removes its debris. Symlinks in the tree must be relative and stay inside it; absolute or
//! escaping links are refused naming the local path.
//!
//! Mode `in-place` (for a directory that must stay a directory, e.g. bind-mounted into a container)
//! uses the same diff and one stream, but `to` itself holds the live files: the stream lands in a
//! staging directory inside `to` (each new file written once) and each staged file is renamed over
//! its destination (atomic per file); live content about to be replaced or deleted is hard-linked
//! into the store first, so earlier releases can be applied again (rollback re-applies one, sending
//! nothing). [`diff::in_place`] decides every path from the live manifest and what the host reports
//! as changed by hand since the last deploy (`<store>/edits.since`, `<store>/applied`). A reader
//! may see a mix of old and new files while it runs; extras are deleted last (unless
//! `delete: false`).

pub mod archive;
pub mod diff;
pub mod manifest;
pub mod remote;
pub mod sent;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::deploy::{StepCtx, StepReport};
use crate::inventory::Host;
use crate::playbook::{SyncMode, SyncRemoveStep, SyncStep};
use crate::report::human_bytes;
use crate::ssh::{Process, Session, SharedSink, Stream};

use manifest::{Manifest, Sealed};
use remote::{Inventory, Paths, TargetState};

const INVENTORY_TIMEOUT: Duration = Duration::from_secs(300);
/// A first deploy hashes files this big that share their size with another before sending, so
/// that copies of big content travel once (in the benchmark's 50,000 files: 6 of 751 such files;
/// at 8 KiB it would be 4,628 of 11,363). Smaller copies travel again.
const COPY_MIN: u64 = 64 << 10;
/// Paths listed per category in `--plan` output and the step's detail.
const LIST_LIMIT: usize = 200;

/// What is live at one sync target on one host, for `ferry status` (read-only, one round trip).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LiveSync {
    /// The remote path (`to`, expanded).
    pub path: String,
    /// The live release id, or `None` when nothing was ever deployed there.
    pub release: Option<String>,
    /// Ref and commit the live release was built from (from its metadata).
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    pub sha: Option<String>,
    /// Unix time the live release was made.
    pub deployed_at: Option<u64>,
    /// Why the path does not look like ferry left it (edited by hand, not a symlink, ...), if so.
    pub drift: Option<String>,
}

/// Start walking and hashing the sources of `steps` (as `host` expands them) while the hosts
/// connect and lock; the steps then find the result waiting in `source`'s memo. (A first
/// deploy stops the hashing: it hashes as it sends. `FERRY_HASH_AHEAD=0` hashes only when a
/// host needs it: tests use it to see a small tree learned.)
pub fn prefetch<'a>(host: &Host, steps: impl IntoIterator<Item = &'a SyncStep>) {
    for step in steps {
        if let Ok(from) = host.expand(&step.from) {
            let (from, exclude) = (PathBuf::from(from), step.exclude.clone());
            tokio::spawn(async move {
                if let Ok(src) = source(from, exclude).await
                    && std::env::var_os("FERRY_HASH_AHEAD").is_none_or(|v| v != "0")
                {
                    let _ = src.hash_once().await;
                }
            });
        }
    }
}

/// The local tree of a deploy as one run sees it: a source directory walked once, and hashed
/// once some host needs the hashes (a first deploy learns them from its stream instead); or the
/// manifest of a release the host has (a rollback).
struct Source {
    walked: Option<manifest::Walked>,
    hashed: tokio::sync::OnceCell<Arc<Manifest>>,
    /// Set by a first deploy: hashing ahead would only compete with its stream for the CPU.
    stop: std::sync::atomic::AtomicBool,
}

impl Source {
    fn known(m: Manifest) -> Source {
        Source {
            walked: None,
            hashed: tokio::sync::OnceCell::new_with(Some(Arc::new(m))),
            stop: Default::default(),
        }
    }

    /// The whole manifest, hashing what the cache did not know (once per run).
    async fn manifest(self: &Arc<Self>) -> anyhow::Result<Arc<Manifest>> {
        loop {
            // (Whoever needs the hashes hashes on: a first deploy stopped only the hashing ahead.)
            self.stop.store(false, std::sync::atomic::Ordering::Relaxed);
            if let Some(m) = self.hash_once().await? {
                return Ok(m);
            }
        }
    }

    /// One try at [`Source::manifest`]; `None` when a first deploy stopped it.
    async fn hash_once(self: &Arc<Self>) -> anyhow::Result<Option<Arc<Manifest>>> {
        let me = self.clone();
        let init = || async move {
            let m = tokio::task::spawn_blocking(move || {
                me.walked
                    .as_ref()
                    .expect("a walked source")
                    .hash_unless(&me.stop)
            })
            .await
            .context("hashing task failed")
            .and_then(|m| m);
            match m {
                Ok(Some(m)) => Ok(Arc::new(m)),
                Ok(None) => Err(None),
                Err(e) => Err(Some(e)),
            }
        };
        match self.hashed.get_or_try_init(init).await {
            Ok(m) => Ok(Some(m.clone())),
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    /// For a stream that hashes files as it sends them: the tree with only copies of big content
    /// hashed (see [`manifest::Walked::hash_copies`]); `None` when all hashes are known anyway.
    async fn for_learning(self: &Arc<Self>) -> Option<anyhow::Result<Manifest>> {
        let w = self.walked.as_ref()?;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if w.unhashed.is_empty() || self.hashed.initialized() {
            return None;
        }
        let me = self.clone();
        let m = tokio::task::spawn_blocking(move || {
            let w = me.walked.as_ref().expect("walked");
            w.hash_copies(COPY_MIN)
        })
        .await
        .context("hashing task failed");
        Some(m.and_then(|m| m))
    }

    /// Keep the hashes a stream learned: later steps and hosts, and the cache, reuse them.
    async fn learned(self: &Arc<Self>, m: Manifest) {
        let m = Arc::new(m);
        if self.hashed.set(m.clone()).is_ok() {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(w) = &me.walked {
                    w.remember(&m);
                }
            })
            .await;
        }
    }
}

/// Walk each source once per run, however many hosts and steps share it.
async fn source(from: PathBuf, exclude: Vec<String>) -> anyhow::Result<Arc<Source>> {
    type Memo = tokio::sync::Mutex<HashMap<(PathBuf, Vec<String>), Arc<Source>>>;
    static MEMO: OnceLock<Memo> = OnceLock::new();
    let mut memo = MEMO.get_or_init(Default::default).lock().await;
    let key = (from.clone(), exclude.clone());
    if let Some(s) = memo.get(&key) {
        return Ok(s.clone());
    }
    let walked = tokio::task::spawn_blocking(move || {
        let cache = manifest::cache_path(&from);
        manifest::walk(&from, &exclude, cache.as_deref())
    })
    .await
    .context("walking task failed")??;
    let s = Arc::new(Source {
        walked: Some(walked),
        hashed: Default::default(),
        stop: Default::default(),
    });
    memo.insert(key, s.clone());
    Ok(s)
}

async fn inventory(
    session: &Session,
    paths: &Paths,
    digest: &str,
    step: &SyncStep,
) -> anyhow::Result<Inventory> {
    let delete = if step.delete { "1" } else { "0" };
    let out = session
        .run_script(
            remote::INVENTORY,
            &[&paths.store, &paths.to, digest, delete, mode_arg(step.mode)],
            Some(INVENTORY_TIMEOUT),
        )
        .await?;
    if !out.success() {
        bail!(
            "{}: reading {} failed ({:?}): {}",
            session.name(),
            paths.store,
            out.status,
            out.tail()
        );
    }
    remote::parse_inventory(&out.stdout, paths.name())
        .with_context(|| format!("{}: reading {}", session.name(), paths.store))
}

/// Refuse targets ferry does not own, with the fix.
fn check_target(host: &str, paths: &Paths, inv: &Inventory, step: &SyncStep) -> anyhow::Result<()> {
    let adopt = step.adopt;
    if step.mode == SyncMode::InPlace {
        let filled = inv.listing.as_ref().map_or(0, Vec::len);
        if inv.target == TargetState::Dir
            && inv.inplace.is_none()
            && filled > 0
            && step.delete
            && !adopt
        {
            bail!(
                "{host}: {} is a directory ferry did not fill ({filled} entries). Nothing was \
                 changed. Set `adopt: true` on the sync step to take it over (files not in the \
                 build are deleted), or `delete: false` to keep them",
                paths.to
            );
        }
        return match &inv.target {
            TargetState::Link { target, .. } => bail!(
                "{host}: {} is a symlink (to {target}); mode `in-place` writes into a real directory \
                 and will not write through a link. Nothing was changed. Use `mode: release`, or \
                 remove the link (and run `ferry sync` again) to switch to in-place",
                paths.to
            ),
            TargetState::Other => bail!(
                "{host}: {} exists and is not a directory; remove it or choose another `to:`",
                paths.to
            ),
            _ => Ok(()),
        };
    }
    match &inv.target {
        TargetState::Dir if inv.inplace.is_some() => bail!(
            "{host}: {} holds release {} applied in place (`mode: in-place`). Nothing was changed. \
             Keep `mode: in-place`, or remove {} and {} to start over in mode release",
            paths.to,
            inv.inplace.as_deref().unwrap_or_default(),
            paths.to,
            paths.store
        ),
        TargetState::Dir if !adopt => bail!(
            "{host}: {} is a plain directory, not a ferry release link. Nothing was changed. \
             To take it over (it is moved into {}/adopted-<release>), set `adopt: true` on the sync step",
            paths.to,
            paths.store
        ),
        TargetState::Other => bail!(
            "{host}: {} exists and is not a directory or symlink; remove it or choose another `to:`",
            paths.to
        ),
        TargetState::Link { target, live: None } if !adopt => bail!(
            "{host}: {} is a symlink to {target}, not to a ferry release. Nothing was changed. \
             Set `adopt: true` on the sync step to replace it",
            paths.to
        ),
        _ => Ok(()),
    }
}

fn truncated(v: &[String]) -> &[String] {
    &v[..v.len().min(LIST_LIMIT)]
}

/// The store paths of a step's `to`, refused when it would hold ferry's own state: the host's
/// `.ferry` directory (ledger, locks) or a release store (adopting either would move it away).
pub(crate) fn target_paths(host: &Host, to: &str) -> anyhow::Result<Paths> {
    let paths = Paths::new(&host.path(to)?).with_context(|| host.name().to_string())?;
    let state = host.state_dir();
    let holds = |dir: &str| dir == paths.to || dir.starts_with(&format!("{}/", paths.to));
    let store = paths
        .to
        .split('/')
        .any(|c| c == ".ferry" || (c.starts_with('.') && c.ends_with(".ferry")));
    if holds(&state) || store {
        bail!(
            "{}: sync target {} would hold or be part of ferry's own state ({state}, or a \
             `.<name>.ferry` release store); point `to:` at a directory of its own",
            host.name(),
            paths.to
        );
    }
    Ok(paths)
}

/// Refuses sync targets of one host that are the same or nested: the outer one's deploy would
/// replace or delete the inner one's files and store, and in release mode the inner one would
/// write into the outer one's live release.
pub(crate) fn disjoint(host: &str, targets: &[String]) -> anyhow::Result<()> {
    for (i, a) in targets.iter().enumerate() {
        for b in &targets[i + 1..] {
            let inside = |outer: &str, inner: &str| {
                inner == outer || inner.starts_with(&format!("{}/", outer.trim_end_matches('/')))
            };
            if inside(a, b) || inside(b, a) {
                bail!(
                    "{host}: sync targets {a} and {b} overlap (one is or lies inside the other): a deploy \
                     of the outer one replaces the inner one, and in release mode the inner one \
                     writes into the outer one's live release; give each step a directory of its own"
                );
            }
        }
    }
    Ok(())
}

pub async fn run(ctx: &StepCtx<'_>, step: &SyncStep) -> anyhow::Result<StepReport> {
    let started = Instant::now();
    let host = ctx.host.name();
    let from = PathBuf::from(ctx.host.expand(&step.from)?);
    let paths = target_paths(ctx.host, &step.to)?;
    if !remote::safe_id(ctx.release) {
        bail!(
            "release id `{}` has characters ferry does not put in paths",
            ctx.release
        );
    }
    let src = source(from.clone(), step.exclude.clone());
    // A plan only reads; a deploy reads and applies in one exec (see remote::DEPLOY), which looks
    // at the host's side while we hash ours.
    let (opened, mut proc) = if ctx.plan {
        let src = src.await?;
        let local = src.manifest().await?;
        let inv = inventory(ctx.session, &paths, &local.digest(), step).await?;
        let o = Opened {
            src,
            local,
            learn: false,
            sealed: None,
            inv,
            lines: None,
        };
        (o, None)
    } else {
        let (o, proc) = open_deploy(ctx.session, &paths, src, step, &ctx.stop, ctx.held).await?;
        (o, Some(proc))
    };
    let Opened {
        src,
        local,
        learn,
        sealed,
        mut inv,
        lines,
    } = opened;
    tracing::debug!(elapsed = ?started.elapsed(), objects = inv.objects.len(), same = inv.same, learn, "inventory of {}", paths.to);
    let decided = decide(ctx, step, &local, &paths, &mut inv, learn);
    let (plan, apply, report) = match decided {
        Ok(Decision::Done(report)) => {
            if let Some(p) = proc.take() {
                finish_quietly(host, &paths, p).await?;
            }
            // (Nothing to switch here: the other hosts need not wait for this one.)
            if let Some(g) = ctx.gate {
                g.arrive(&step.to);
            }
            return Ok(*report);
        }
        Ok(Decision::Send(both)) => *both,
        Err(e) => {
            if let Some(mut p) = proc.take() {
                let _ = p.finish().await;
            }
            return Err(e);
        }
    };
    let proc = proc.expect("deploys hold the process");
    let (files, bytes) = local.file_stats();
    let live = inv.live().map(str::to_string);
    let meta = remote::Meta {
        version: 1,
        ref_name: ctx.deploy.ref_name.clone(),
        sha: ctx.deploy.sha.clone(),
        pipeline: ctx.deploy.pipeline_id.clone(),
        user: ctx.deploy.user.clone(),
        time: crate::report::unix_now(),
        files,
        bytes,
        digest: String::new(),
        previous: live.clone(),
    };
    let mut releases = inv.releases.clone();
    releases.push(ctx.release.to_string());
    // Never pruned: this release and the live one (a rollback's target once this one is live).
    // Also the one before the live one (where a rollback goes while the live one stays live)
    // when a failure later in the run (a later step, another host) would switch back to the live
    // one, or while releases newer than the live one are on the host (failed deploys, or one
    // rolled away from: they count toward `keep`, and failures in a row would prune it).
    let mut protect = vec![ctx.release];
    if let Some(l) = &live {
        protect.push(l);
        if (ctx.switched_back_on_failure || inv.releases.iter().any(|r| r.as_str() > l.as_str()))
            && let Some(p) = inv.metas.get(l).and_then(|m| m.previous.as_deref())
        {
            protect.push(p);
        }
    }
    // (Also the metadata of releases deleted by hand: it names content no release holds.)
    let orphans = inv
        .metas
        .keys()
        .filter(|id| !releases.contains(id))
        .cloned();
    let prune: Vec<String> = diff::prune(&releases, step.keep, &protect)
        .into_iter()
        .chain(orphans)
        .filter(|r| remote::safe_id(r))
        .collect();
    let hold = ctx.gate.zip(lines).map(|(gate, lines)| Hold {
        gate,
        lines,
        step: &step.to,
    });
    let params = params_line(
        ctx.release,
        step.adopt,
        &prune,
        &inv.drifted,
        false,
        hold.is_some(),
        !inv.excluded.is_empty(),
    );
    let written = apply.as_ref().map(|a| a.write.len() as u64);
    // The manifest the trailer carried, kept for the next deploy (see `sent`).
    let carried = Arc::new(OnceLock::<Sealed>::new());
    // Release mode: the modes of the objects the store holds, for its `modes-used`.
    let store_modes: Option<std::collections::BTreeSet<u32>> = apply
        .is_none()
        .then(|| inv.objects.iter().map(|o| o.mode).collect());
    let build = {
        let carried = carried.clone();
        let (root, local, plan) = (from.clone(), local.clone(), plan.clone());
        let name = paths.name().to_string();
        let plain = inv.plain;
        let compress_all =
            step.compress == crate::playbook::Compress::All || plan.send_bytes < archive::BULK;
        move |out: archive::ChannelWriter, sent: &dyn Fn(u64)| {
            // (Made from the manifest sent: when the stream learns the hashes, only at its end.)
            let trailer = |m: &Manifest| {
                let s = match &sealed {
                    Some(s) if std::ptr::eq(m, &*local) => s.clone(),
                    _ => m.seal(),
                };
                let _ = carried.set(s.clone());
                let meta = remote::Meta {
                    digest: s.digest.clone(),
                    ..meta.clone()
                };
                Ok(archive::Extras {
                    manifest: s.bytes,
                    digest: s.digest,
                    meta_json: serde_json::to_vec(&meta)?,
                    object_modes: store_modes.as_ref().map(|s| remote::object_modes(s, m)),
                })
            };
            let sink = archive::Sink {
                out,
                sent,
                plain,
                compress_all,
                learn,
            };
            match &apply {
                Some(apply) => {
                    archive::write_in_place(&root, &name, &local, apply, Some(&trailer), sink)
                }
                None => archive::write(&root, &local, &plan, Some(&trailer), sink),
            }
        }
    };
    let wire = stream(ctx, proc, &params, plan.send_bytes, build, &paths, hold).await?;
    if let Some(m) = wire.learned {
        src.learned(m).await;
    }
    if let Some(s) = carried.get().cloned() {
        let _ = tokio::task::spawn_blocking(move || sent::keep(&s)).await;
    }
    let release = wire.release;
    tracing::debug!(elapsed = ?started.elapsed(), wire = wire.bytes, "applied release {release}");
    let mut report = report;
    report.detail["release"] = release.clone().into();
    report.detail["previous"] = live.clone().into();
    report.detail["wire_bytes"] = wire.bytes.into();
    if let Some(a) = &written {
        report.detail["replaced_in_place"] = wire.copied.unwrap_or(*a).into();
    }
    report.detail["pruned"] = prune.clone().into();
    // What `to` was when nothing was live there: what a failed run puts back (see `withdraw`).
    if live.is_none() {
        report.detail["before"] = match &inv.target {
            TargetState::Missing => serde_json::json!({"state": "missing"}),
            TargetState::Dir => serde_json::json!({"state": "dir"}),
            TargetState::Link { target, .. } => {
                serde_json::json!({"state": "link", "target": target})
            }
            TargetState::Other => serde_json::Value::Null,
        };
    }
    report.log.extend(wire.warnings);
    report.summary = format!(
        "{} -> release {release}: {}; sent {} files ({} content, {} on the wire) in {:.1}s",
        paths.to,
        report.summary,
        plan.send.len(),
        human_bytes(plan.send_bytes),
        human_bytes(wire.bytes),
        started.elapsed().as_secs_f64()
    );
    report.files_sent = plan.send.len() as u64;
    report.bytes_sent = wire.bytes;
    Ok(report)
}

/// The deploy script's parameter line (see [`remote::DEPLOY`]).
fn params_line(
    id: &str,
    adopt: bool,
    prune: &[String],
    drop: &[manifest::ObjectId],
    again: bool,
    hold: bool,
    kept_excluded: bool,
) -> String {
    let drop: Vec<String> = drop.iter().map(ToString::to_string).collect();
    let list = |v: &[String]| {
        let v: Vec<&str> = v
            .iter()
            .map(String::as_str)
            .filter(|s| remote::safe_id(s))
            .collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    format!(
        "{id} {} {} {} {} {} {}\n",
        u8::from(adopt),
        list(prune),
        list(&drop),
        u8::from(again),
        u8::from(hold),
        u8::from(kept_excluded)
    )
}

/// In place, what `exclude` matches in `to` stays (the patterns were checked when the playbook
/// was read).
fn keep_excluded(step: &SyncStep, inv: &mut Inventory) {
    if step.mode == SyncMode::InPlace
        && !step.exclude.is_empty()
        && let Ok(gi) = manifest::excludes(&step.exclude)
    {
        inv.keep_excluded(&gi);
    }
}

/// In place, refuse a tree that puts a file where `to` has a directory holding what stays.
fn check_in_the_way(
    host: &str,
    paths: &Paths,
    step: &SyncStep,
    apply: Option<&diff::Apply>,
) -> anyhow::Result<()> {
    let Some((dir, kept)) = apply.and_then(|a| a.in_the_way.as_ref()) else {
        return Ok(());
    };
    let why = match step.delete {
        true => "`exclude` matches it",
        false => "`delete: false` keeps what the build lacks",
    };
    bail!(
        "{host}: the tree has a file at `{}`, but in {} that is a directory holding `{}`, which \
         stays ({why}); nothing was changed. Move it away on the host, or change the build",
        manifest::display_path(dir),
        paths.to,
        manifest::display_path(kept),
    )
}

/// What a deploy must send and, in mode `in-place`, apply; with the objects the host has.
/// `learn`: `local`'s hashes are not known yet, and the host has nothing (see [`Opened`]).
fn plan_for(
    step: &SyncStep,
    local: &Manifest,
    inv: &mut Inventory,
    learn: bool,
) -> (diff::Plan, Option<diff::Apply>) {
    keep_excluded(step, inv);
    if learn {
        let plan = diff::plan_all(local);
        let apply = (step.mode == SyncMode::InPlace).then(|| {
            let target = inv.in_place_target();
            diff::in_place(local, &target, &Default::default(), &plan.send, step.delete)
        });
        return (plan, apply);
    }
    if inv.same {
        let unchanged = local
            .entries
            .iter()
            .filter(|e| !matches!(e.kind, manifest::Kind::Dir { .. }))
            .count() as u64;
        let plan = diff::Plan {
            unchanged,
            ..Default::default()
        };
        let apply = (step.mode == SyncMode::InPlace).then(diff::Apply::default);
        return (plan, apply);
    }
    let objects = inv.trusted_objects();
    if step.mode == SyncMode::Release {
        return (
            diff::plan(local, inv.live_manifest.as_ref(), &objects),
            None,
        );
    }
    let target = inv.in_place_target();
    let mut have = objects.clone();
    have.extend(target.contents().keys().cloned());
    let mut plan = diff::plan(local, target.live, &have);
    // (Paths `exclude` matches now stay: not deleted.)
    if !target.keep.is_empty() {
        let kept: std::collections::HashSet<String> = target
            .keep
            .iter()
            .map(|p| manifest::display_path(p))
            .collect();
        plan.deleted.retain(|p| !kept.contains(p));
    }
    let apply = diff::in_place(local, &target, &objects, &plan.send, step.delete);
    inv.handmade = apply.handmade;
    (plan, Some(apply))
}

enum Decision {
    /// Nothing to send: a no-op or a plan; the report is final.
    Done(Box<StepReport>),
    /// Send this (and apply it, in place); the report's summary holds the change counts so far.
    Send(Box<(diff::Plan, Option<diff::Apply>, StepReport)>),
}

/// The pure middle of a deploy: refuse, report a no-op or a plan, or say what to send.
fn decide(
    ctx: &StepCtx<'_>,
    step: &SyncStep,
    local: &Manifest,
    paths: &Paths,
    inv: &mut Inventory,
    learn: bool,
) -> anyhow::Result<Decision> {
    check_target(ctx.host.name(), paths, inv, step)?;
    if step.mode == SyncMode::InPlace
        && let Some(e) = local
            .entries
            .iter()
            .find(|e| e.path.starts_with(archive::STAGING.as_bytes()))
    {
        bail!(
            "{}: `{}` in {} is a name ferry reserves in mode in-place (its staging area); rename it",
            ctx.host.name(),
            e.display(),
            paths.to
        );
    }
    let (plan, apply) = plan_for(step, local, inv, learn);
    check_in_the_way(ctx.host.name(), paths, step, apply.as_ref())?;
    let mut log = Vec::new();
    if let Some(d) = inv.drift() {
        log.push(format!(
            "drift at {}: {d}; the changed files are replaced by this deploy",
            paths.to
        ));
    }
    let live = inv.live().map(str::to_string);
    let settled = apply
        .as_ref()
        .is_none_or(|a| a.write.is_empty() && a.dirs.is_empty() && a.gone.is_empty());
    // (A live release whose directory was deleted by hand is made anew.)
    let intact = live
        .as_ref()
        .is_some_and(|l| inv.releases.iter().any(|r| r == l));
    let noop = plan.is_noop() && plan.send.is_empty() && inv.handmade == 0 && settled && intact;
    // In place with `delete: false`, what left the build stays on the host.
    let mut plan = plan;
    let kept = match step.mode == SyncMode::InPlace && !step.delete {
        true => std::mem::take(&mut plan.deleted),
        false => Vec::new(),
    };
    let repair = repairs(local, &plan, apply.as_ref(), inv);
    let detail = serde_json::json!({
        "path": paths.to,
        "live": live,
        "added": plan.added.len(),
        "changed": plan.changed.len(),
        "deleted": plan.deleted.len(),
        "kept": kept.len(),
        "unchanged": plan.unchanged,
        "changed_bytes": plan.changed_bytes,
        "files_to_send": plan.send.len(),
        "content_bytes_to_send": plan.send_bytes,
        "drift": inv.drift(),
        "paths": {
            "added": truncated(&plan.added),
            "changed": truncated(&plan.changed),
            "deleted": truncated(&plan.deleted),
            "kept": truncated(&kept),
        },
        "repair": {
            "replaced": truncated(&repair.replaced),
            "deleted": truncated(&repair.deleted),
        },
    });
    let mut counts = format!(
        "+{} ~{} -{} ({} changed)",
        plan.added.len(),
        plan.changed.len(),
        plan.deleted.len(),
        human_bytes(plan.changed_bytes)
    );
    if !kept.is_empty() {
        counts += &format!(", {} kept (delete: false)", kept.len());
    }
    if step.mode == SyncMode::Release && inv.target == TargetState::Dir {
        counts += &format!(
            "; adopts the plain directory there (moved to {}/adopted-<release>, no longer served)",
            paths.store
        );
    }
    if repair.len() > 0 {
        counts += &format!(
            "; repairs {} path(s) changed by hand ({} put back, {} deleted)",
            repair.len(),
            repair.replaced.len(),
            repair.deleted.len()
        );
    }
    let report = |changed, summary| StepReport {
        step: "sync".into(),
        changed,
        summary,
        log: log.clone(),
        detail: detail.clone(),
        ..Default::default()
    };
    if noop {
        return Ok(Decision::Done(Box::new(report(
            false,
            format!(
                "{} unchanged: release {} already live",
                paths.to,
                live.unwrap_or_default()
            ),
        ))));
    }
    if ctx.plan {
        let mut r = report(
            true,
            format!(
                "would deploy {}: {counts}; would send {} files ({})",
                paths.to,
                plan.send.len(),
                human_bytes(plan.send_bytes)
            ),
        );
        for (sign, list, why) in [
            ("+", &plan.added, ""),
            ("~", &plan.changed, ""),
            ("-", &plan.deleted, ""),
            ("=", &kept, " (kept: delete: false)"),
            ("~", &repair.replaced, " (changed by hand)"),
            ("-", &repair.deleted, " (on the host only)"),
        ] {
            for p in truncated(list) {
                r.log.push(format!("  {sign} {p}{why}"));
            }
        }
        return Ok(Decision::Done(Box::new(r)));
    }
    Ok(Decision::Send(Box::new((
        plan,
        apply,
        report(true, counts),
    ))))
}

/// What a deploy changes beyond the difference of the two manifests: the paths changed by hand
/// that it puts back, and those on the host only (added by hand) that it deletes.
#[derive(Debug, Default)]
struct Repairs {
    replaced: Vec<String>,
    deleted: Vec<String>,
}

impl Repairs {
    fn len(&self) -> usize {
        self.replaced.len() + self.deleted.len()
    }
}

fn repairs(
    local: &Manifest,
    plan: &diff::Plan,
    apply: Option<&diff::Apply>,
    inv: &Inventory,
) -> Repairs {
    let listed: rustc_hash::FxHashSet<&str> = [&plan.added, &plan.changed, &plan.deleted]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut r = Repairs::default();
    let note = |list: &mut Vec<String>, path: &[u8], dir: bool| {
        let p = manifest::display_path(path) + if dir { "/" } else { "" };
        if !listed.contains(p.as_str()) && !list.contains(&p) {
            list.push(p);
        }
    };
    match apply {
        // In place: what the apply writes or deletes that the diff does not name.
        Some(a) => {
            for (i, _) in &a.write {
                note(&mut r.replaced, &local.entries[*i].path, false);
            }
            // (A directory the build dropped goes once, as a path the live release has.)
            let live: rustc_hash::FxHashSet<&[u8]> = inv
                .live_manifest
                .iter()
                .flat_map(|m| m.entries.iter().map(|e| e.path.as_slice()))
                .collect();
            for p in a.gone.iter().filter(|p| !live.contains(p.as_slice())) {
                note(&mut r.deleted, p, false);
            }
        }
        // Release mode: the live release's paths changed by hand are made anew, or left out.
        None => {
            let kinds: rustc_hash::FxHashMap<&[u8], bool> = local
                .entries
                .iter()
                .map(|e| {
                    (
                        e.path.as_slice(),
                        matches!(e.kind, manifest::Kind::Dir { .. }),
                    )
                })
                .collect();
            let top = |p: &&Vec<u8>| p.as_slice() != b".";
            for p in inv
                .edited
                .iter()
                .chain(&inv.touched)
                .chain(&inv.marked)
                .filter(top)
            {
                match kinds.get(p.as_slice()) {
                    Some(&dir) => note(&mut r.replaced, p, dir),
                    None => note(&mut r.deleted, p, false),
                }
            }
        }
    }
    r.replaced.sort();
    r.deleted.sort();
    r
}

/// What [`open_deploy`] learned: the local tree and what the host has.
struct Opened {
    src: Arc<Source>,
    /// The local manifest; with `learn`, its files' hashes are not known yet (zero).
    local: Arc<Manifest>,
    /// Nothing on the host can spare sending a file (no store; in place, no `to` either): the
    /// stream sends every file unhashed and hashes it as it reads it.
    learn: bool,
    /// `local` encoded, unless it learns its hashes on the way.
    sealed: Option<Sealed>,
    inv: Inventory,
    /// The deploy script's output lines after its inventory (a deploy's, not a plan's).
    lines: Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>,
}

/// Start the deploy script while `src` is walked; once the host says whether it has a store,
/// hash the tree (unless nothing there could spare sending a file) and hand the host its digest;
/// read the inventory. The process then waits for our decision.
async fn open_deploy(
    session: &Session,
    paths: &Paths,
    src: impl std::future::Future<Output = anyhow::Result<Arc<Source>>>,
    step: &SyncStep,
    stop: &tokio::sync::watch::Receiver<bool>,
    held: Option<(&str, &str)>,
) -> anyhow::Result<(Opened, Process)> {
    let host = session.name().to_string();
    let (lock, token) = held.unwrap_or_default();
    let cmd = Session::script_command(
        remote::DEPLOY,
        &[
            paths.store.as_str(),
            paths.to.as_str(),
            mode_arg(step.mode),
            if step.delete { "1" } else { "0" },
            lock,
            token,
        ],
    )?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let sink: SharedSink = Arc::new(move |s: Stream, line: &[u8]| {
        if s == Stream::Stdout {
            let _ = tx.send(line.to_vec());
        }
    });
    let (src, proc) = tokio::join!(src, session.spawn(&cmd, Some(sink)));
    let mut proc = proc?;
    let src = match src {
        Ok(s) => s,
        Err(e) => {
            proc.abort().await;
            return Err(e);
        }
    };
    // An interrupt stops the exchange; the script, told nothing, ends without a change.
    let exchanged = tokio::select! {
        r = exchange(&host, &mut proc, &mut rx, src, paths, step.mode) => Some(r),
        _ = crate::deploy::interrupted(stop) => None,
    };
    match exchanged {
        Some(Ok(mut opened)) => {
            opened.lines = Some(rx);
            Ok((opened, proc))
        }
        Some(Err(e)) => {
            // (Stopped already when the failure was the script's; else it waits for a line.)
            proc.abort().await;
            Err(e)
        }
        None => {
            let _ = proc.finish().await;
            Err(interrupted(&host, paths))
        }
    }
}

/// The error for an interrupt that stopped a deploy before its switch.
fn interrupted(host: &str, paths: &Paths) -> anyhow::Error {
    anyhow::anyhow!(
        "{host}: interrupted (SIGINT/SIGTERM) before the switch; {} is unchanged",
        paths.to
    )
}

/// The deploy script's inventory, our tree's digest (hashed meanwhile), and the rest of the
/// inventory: what [`open_deploy`] needs to decide. Stops the script on failure.
async fn exchange(
    host: &str,
    proc: &mut Process,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    src: Arc<Source>,
    paths: &Paths,
    mode: SyncMode,
) -> anyhow::Result<Opened> {
    let mut buf = Vec::new();
    // The live digest comes first (the host writes a line after it), then, after the host's scans,
    // the store record. Meanwhile we look up the live manifest, if files changed (see `sent`).
    if let Err(timed_out) = read_until(rx, &mut buf, remote::digest_known).await {
        return Err(inventory_failed(host, paths, proc, timed_out).await);
    }
    let recall = |d: String| tokio::task::spawn_blocking(move || sent::recall(&d));
    let changed = src.walked.as_ref().is_some_and(|w| !w.unhashed.is_empty());
    let early_recall = remote::parse_inventory(&buf, paths.name())
        .ok()
        .and_then(|i| i.live_digest)
        .filter(|_| changed)
        .map(recall);
    if let Err(timed_out) = read_until(rx, &mut buf, remote::store_known).await {
        return Err(inventory_failed(host, paths, proc, timed_out).await);
    }
    let early = remote::parse_inventory(&buf, paths.name())
        .with_context(|| format!("{host}: reading {}", paths.store))?;
    let bare = !early.store && (mode == SyncMode::Release || early.target == TargetState::Missing);
    let learning = match bare {
        true => src.for_learning().await,
        false => None,
    };
    let hashed = match learning {
        Some(m) => m.map(|m| (Arc::new(m), None)),
        None => match src.manifest().await {
            Ok(m) => {
                let me = m.clone();
                let sealed = tokio::task::spawn_blocking(move || me.seal()).await;
                sealed.context("encoding task failed").map(|s| (m, Some(s)))
            }
            Err(e) => Err(e),
        },
    };
    let (local, sealed) = match hashed {
        Ok(x) => x,
        Err(e) => {
            proc.abort().await;
            return Err(e);
        }
    };
    // (An unchanged tree needs no live manifest.)
    let kept = match (&early.live_digest, &sealed) {
        (Some(live), Some(s)) if *live != s.digest => {
            let job = early_recall.unwrap_or_else(|| recall(live.clone()));
            job.await.ok().flatten()
        }
        _ => None,
    };
    let digest = sealed.as_ref().map_or("-", |s| s.digest.as_str());
    proc.write(format!("{digest} {}\n", u8::from(kept.is_some())).as_bytes())
        .await
        .with_context(|| format!("{host}: the deploy script at {} went away", paths.store))?;
    let mut from = 0;
    let until = |b: &[u8]| {
        remote::inventory_scan(b, from)
            .map_err(|resume| from = resume)
            .ok()
    };
    let end = match read_until(rx, &mut buf, until).await {
        Ok(end) => end,
        Err(timed_out) => return Err(inventory_failed(host, paths, proc, timed_out).await),
    };
    let mut inv = remote::parse_inventory(&buf[..end], paths.name())
        .with_context(|| format!("{host}: reading {}", paths.store))?;
    if let Some(m) = kept
        && !inv.same
        && inv.live_manifest.is_none()
    {
        tracing::debug!("the live manifest was kept here; the host did not send it");
        inv.set_live_manifest(m);
    }
    Ok(Opened {
        src,
        local,
        learn: sealed.is_none(),
        sealed,
        inv,
        lines: None,
    })
}

/// Read the host's output lines into `buf` until `until` finds where what we wait for ends.
/// `Err(timed_out)`: the output ended, or nothing came for [`INVENTORY_TIMEOUT`].
async fn read_until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    buf: &mut Vec<u8>,
    mut until: impl FnMut(&[u8]) -> Option<usize>,
) -> Result<usize, bool> {
    loop {
        if let Some(n) = until(buf) {
            return Ok(n);
        }
        // Records end with a NUL: only a line holding one can complete what we wait for. (Looking
        // after every line went over a long record once per line: the object list of a store
        // of 5,000 objects took 0.65 s.)
        loop {
            match tokio::time::timeout(INVENTORY_TIMEOUT, rx.recv()).await {
                Ok(Some(line)) => {
                    buf.extend_from_slice(&line);
                    buf.push(b'\n');
                    if line.contains(&0) {
                        break;
                    }
                }
                Ok(None) => return Err(false),
                Err(_) => return Err(true),
            }
        }
    }
}

/// The error for a deploy script whose inventory did not come; stops it.
async fn inventory_failed(
    host: &str,
    paths: &Paths,
    proc: &mut Process,
    timed_out: bool,
) -> anyhow::Error {
    if timed_out {
        proc.abort().await;
        return anyhow::anyhow!(
            "{host}: no inventory of {} within {INVENTORY_TIMEOUT:?}",
            paths.store
        );
    }
    match proc.finish().await {
        Ok(out) => anyhow::anyhow!(
            "{host}: reading {} failed ({:?}): {}",
            paths.store,
            out.status,
            out.tail()
        ),
        Err(e) => e.into(),
    }
}

fn mode_arg(mode: SyncMode) -> &'static str {
    match mode {
        SyncMode::Release => "release",
        SyncMode::InPlace => "in-place",
    }
}

/// Close the deploy script's stdin without a decision: it stops after its cleanup.
async fn finish_quietly(host: &str, paths: &Paths, mut proc: Process) -> anyhow::Result<()> {
    let out = proc.finish().await?;
    if !out.success() {
        bail!("{host}: cleaning up {} failed: {}", paths.store, out.tail());
    }
    Ok(())
}

struct Sent {
    release: String,
    bytes: u64,
    /// In-place mode: files the host replaced in `to`.
    copied: Option<u64>,
    /// What the host reported but did not fail on (a release it could not prune).
    warnings: Vec<String>,
    /// The manifest sent, when the stream learned its hashes.
    learned: Option<Manifest>,
}

/// Send the parameter line and the archive (`build` writes it) into the waiting deploy script,
/// and check the result.
async fn stream<B>(
    ctx: &StepCtx<'_>,
    mut proc: Process,
    params: &str,
    send_bytes: u64,
    build: B,
    paths: &Paths,
    hold: Option<Hold<'_>>,
) -> anyhow::Result<Sent>
where
    B: FnOnce(archive::ChannelWriter, &dyn Fn(u64)) -> anyhow::Result<Option<Manifest>>
        + Send
        + 'static,
{
    let host = ctx.host.name().to_string();
    let progress = ctx.progress.host(&host, "sync", send_bytes);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let builder = {
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            let out = archive::ChannelWriter {
                tx,
                buf: Vec::new(),
            };
            build(out, &|n| progress.add(n))
        })
    };
    let mut bytes = params.len() as u64;
    // An interrupt ends the stream where it is: without its trailer the host cleans up and keeps
    // the live release (the script's verdict below says which happened, should the last bytes
    // have gone out already).
    let already = *ctx.stop.borrow();
    let (write_failed, stopped) = if already {
        (None, true)
    } else {
        let forward = async {
            proc.write(params.as_bytes()).await?;
            while let Some(chunk) = rx.recv().await {
                proc.write(&chunk).await?;
                bytes += chunk.len() as u64;
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            biased;
            _ = crate::deploy::interrupted(&ctx.stop) => (None, true),
            r = forward => (r.err(), false),
        }
    };
    drop(rx);
    let built = builder.await.context("stream task failed")?;
    progress.finish();
    if let (Err(e), None, false) = (&built, &write_failed, stopped) {
        proc.abort().await;
        return Err(anyhow::anyhow!("{e:#}"))
            .with_context(|| format!("{host}: deploy to {} aborted", paths.to));
    }
    let out = match hold {
        Some(hold) => {
            let cut = stopped || write_failed.is_some() || built.is_err();
            held(ctx, &mut proc, hold, paths, cut).await?
        }
        None => proc.finish().await?,
    };
    let tail_start = remote::inventory_end(&out.stdout).unwrap_or(0);
    let tail = String::from_utf8_lossy(&out.stdout[tail_start..]);
    let release = tail
        .lines()
        .find_map(|l| l.strip_prefix("release ").map(str::to_string));
    if stopped && (release.is_none() || !out.success()) {
        // Exit 0 without a release (told nothing) or 3 (stopped and cleaned up): `to` is as it was.
        return Err(match out.status {
            Some(0 | 3) => interrupted(&host, paths),
            _ => anyhow::anyhow!(
                "{host}: interrupted (SIGINT/SIGTERM) while deploying to {} ({}): {}",
                paths.to,
                out.exit(),
                out.tail()
            ),
        });
    }
    if out.status.is_none() {
        // (Its stdout is protocol records: not for people.)
        bail!(
            "{host}: the connection ended before the deploy script said how the deploy to {} went; \
             once the whole stream is sent, the host finishes the switch by itself: `ferry status` \
             shows what is live",
            paths.to
        );
    }
    if !out.success() {
        let why = match out.stderr.iter().all(u8::is_ascii_whitespace) {
            true => "it gave no reason".to_string(),
            false => out.tail(),
        };
        // (GNU tar says a short write, not why: on a full disk, `Wrote only N of M bytes`.)
        let full = [
            "No space left on device",
            "Wrote only",
            "Disk quota exceeded",
        ]
        .iter()
        .any(|s| why.contains(s));
        bail!(
            "{host}: deploy to {} failed ({}): {why}{}",
            paths.to,
            out.exit(),
            if full {
                format!(
                    "\n(the host's disk looks full where {} is: free some space there and deploy \
                     again)",
                    paths.store
                )
            } else {
                String::new()
            }
        );
    }
    let learned = built.with_context(|| format!("{host}: sending to {}", paths.to))?;
    let release =
        release.with_context(|| format!("{host}: the host did not confirm the release"))?;
    let copied = tail
        .lines()
        .find_map(|l| l.strip_prefix("copied ")?.trim().parse().ok());
    let warnings = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("ferry: "))
        .map(|l| format!("WARNING: {}", &l["ferry: ".len()..]))
        .collect();
    Ok(Sent {
        release,
        bytes,
        copied,
        warnings,
        learned,
    })
}

/// A deploy script told to hold before its switch: the gate, the script's output lines, and the
/// step (its `to` as written, the same on every host) that names its gate.
struct Hold<'a> {
    gate: &'a crate::gate::Gate,
    lines: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    step: &'a str,
}

/// The end of a stream whose script holds before its switch (see `gate`): once it says `ready`,
/// wait at the gate for every host, tell it to switch or not (`go-<id>` or `abort-<id>` in its
/// `incoming/`), and wait for its end. `cut`: the stream did not end well, so no switch.
async fn held(
    ctx: &StepCtx<'_>,
    proc: &mut Process,
    mut hold: Hold<'_>,
    paths: &Paths,
    cut: bool,
) -> anyhow::Result<crate::ssh::Output> {
    let host = ctx.host.name();
    proc.close_stdin().await;
    // (No `ready`: the script failed before it, and its output says why.)
    while let Some(line) = hold.lines.recv().await {
        if line != b"ready" {
            continue;
        }
        let verdict = if cut {
            Err(None)
        } else {
            tokio::select! {
                r = hold.gate.pass(hold.step) => r.map_err(Some),
                _ = crate::deploy::interrupted(&ctx.stop) => Err(None),
            }
        };
        let word = if verdict.is_ok() { "go" } else { "abort" };
        let signal = format!("{}/incoming/{word}-{}", paths.store, ctx.release);
        let told = ctx
            .session
            .run(&["touch", "--", &signal], Some(Duration::from_secs(60)))
            .await;
        if !matches!(&told, Ok(o) if o.success()) {
            // (Its next sign of life fails on the closed channel: it ends without a switch.)
            proc.abort().await;
            bail!(
                "{host}: cannot tell the deploy script to {word}: {}; {} is unchanged (the next \
                 deploy cleans up)",
                match &told {
                    Ok(o) => o.tail(),
                    Err(e) => e.to_string(),
                },
                paths.to
            );
        }
        let out = proc.wait().await?;
        match verdict {
            Err(Some(other)) if out.status == Some(3) => bail!(
                "{host}: not switched: host {other} of this deploy failed before every host was \
                 ready to switch {}; it is unchanged here too (hosts switch together: deploy again \
                 once {other} is right, or leave it out with --limit)",
                paths.to
            ),
            Err(None) if out.status == Some(3) && !cut => return Err(interrupted(host, paths)),
            _ => return Ok(out),
        }
    }
    Ok(proc.wait().await?)
}

pub async fn rollback(
    ctx: &StepCtx<'_>,
    step: &SyncStep,
    to: Option<&str>,
) -> anyhow::Result<StepReport> {
    let host = ctx.host.name();
    let paths = target_paths(ctx.host, &step.to)?;
    let inv = inventory(ctx.session, &paths, "-", step).await?;
    let live = inv.live().map(str::to_string);
    let target = match to {
        Some(t) => {
            if !inv.releases.iter().any(|r| r == t) {
                bail!(
                    "{host}: release {t} is not on the host under {}/releases (have: {})",
                    paths.store,
                    inv.releases.join(", ")
                );
            }
            t.to_string()
        }
        None => {
            let live = live.as_deref().with_context(|| {
                format!(
                    "{host}: nothing is live at {}, so there is nothing to roll back",
                    paths.to
                )
            })?;
            let previous = inv
                .metas
                .get(live)
                .and_then(|m| m.previous.clone())
                .filter(|p| inv.releases.contains(p));
            previous
                .or_else(|| {
                    inv.releases
                        .iter()
                        .rev()
                        .find(|r| r.as_str() < live)
                        .cloned()
                })
                .with_context(|| {
                    format!(
                        "{host}: {} has no release before {live} to roll back to",
                        paths.to
                    )
                })?
        }
    };
    let what = inv
        .metas
        .get(&target)
        .map(|m| format!(" ({} {})", m.ref_name, &m.sha[..m.sha.len().min(8)]))
        .unwrap_or_default();
    let detail = serde_json::json!({"path": paths.to, "from": live, "to": target});
    // (The run rolled back to left the files that are live: a deploy of the same build. In place,
    // what was changed by hand in them since is put back below.)
    let same = live.as_deref() == Some(target.as_str());
    if same && step.mode == SyncMode::Release {
        return Ok(StepReport {
            step: "sync".into(),
            changed: false,
            summary: format!(
                "{}: release {target}{what} is live already (the run rolled back to left these \
                 files); they do not change",
                paths.to
            ),
            detail,
            ..Default::default()
        });
    }
    if ctx.plan {
        // In place, what the host still has of that release decides whether it can come back.
        // Release mode: the files of it edited by hand since, which it would serve as edited.
        let mut log = Vec::new();
        if step.mode == SyncMode::InPlace {
            let local = release_manifest(ctx, &paths, &target).await?;
            let mut inv = inventory(ctx.session, &paths, &local.digest(), step).await?;
            let (plan, apply) = plan_for(step, &local, &mut inv, false);
            check_in_the_way(host, &paths, step, apply.as_ref())?;
            check_reapply(host, &target, &local, &plan)?;
        } else {
            let out = host_script(ctx, remote::EDITED, &[&paths.store, &target], || {
                format!(
                    "reading what was edited of release {target} in {}",
                    paths.store
                )
            })
            .await?;
            log.extend(edited_warning(&target, &out.stdout));
        }
        return Ok(StepReport {
            log,
            step: "sync".into(),
            changed: true,
            summary: match same {
                true => format!(
                    "{}: release {target}{what} is live already; would put back what was changed \
                     by hand in it, if anything",
                    paths.to
                ),
                false => format!("would switch {} to release {target}{what}", paths.to),
            },
            detail,
            ..Default::default()
        });
    }
    let mut log = Vec::new();
    let done = if step.mode == SyncMode::InPlace {
        let changed = reapply(ctx, step, &paths, &target).await?;
        if same {
            return Ok(StepReport {
                step: "sync".into(),
                changed,
                summary: format!(
                    "{}: release {target}{what} is live already (the run rolled back to left \
                     these files){}",
                    paths.to,
                    match changed {
                        true => "; what was changed by hand in it is put back",
                        false => "; nothing changes",
                    }
                ),
                detail,
                ..Default::default()
            });
        }
        "re-applied release"
    } else {
        let out = host_script(
            ctx,
            remote::SWITCH,
            &[&paths.store, &paths.to, &target],
            || format!("switching {} to {target}", paths.to),
        )
        .await?;
        log.extend(edited_warning(&target, &out.stdout));
        "switched to release"
    };
    Ok(StepReport {
        step: "sync".into(),
        changed: true,
        summary: format!("{} {done} {target}{what}", paths.to),
        log,
        detail,
        ..Default::default()
    })
}

/// A run that failed after its sync step made the first release live at `to` (nothing was live
/// there before) takes it off again, so a half-done first deploy does not stay live: release
/// mode puts back what `to` was (missing, the directory it adopted, the link it replaced); in
/// place, a tree that went into a missing `to` goes to the store's trash. The release stays in
/// the store. Returns `None` when `to` cannot go back (in place, a directory it filled).
pub async fn withdraw(
    ctx: &StepCtx<'_>,
    step: &SyncStep,
    report: &StepReport,
) -> anyhow::Result<Option<StepReport>> {
    let paths = target_paths(ctx.host, &step.to)?;
    let field = |k: &str| report.detail.get("before").and_then(|b| b.get(k)?.as_str());
    let (Some(release), Some(before)) = (
        report.detail.get("release").and_then(|v| v.as_str()),
        field("state"),
    ) else {
        return Ok(None);
    };
    let mode = match step.mode {
        SyncMode::InPlace if before != "missing" => return Ok(None),
        SyncMode::InPlace => "in-place",
        SyncMode::Release => "release",
    };
    let link = field("target").unwrap_or_default();
    let args = [&paths.store, &paths.to, release, mode, before, link];
    host_script(ctx, remote::WITHDRAW, &args, || {
        format!("taking release {release} off {}", paths.to)
    })
    .await?;
    let was = match before {
        "missing" => "missing again".to_string(),
        "dir" => format!(
            "the directory it was before ({}/adopted-{release} moved back)",
            paths.store
        ),
        _ => format!("the link to {link} again"),
    };
    Ok(Some(StepReport {
        step: "sync".into(),
        changed: true,
        summary: format!("{} is {was}", paths.to),
        detail: serde_json::json!({"path": paths.to, "from": release, "withdrawn": true}),
        ..Default::default()
    }))
}

/// A warning for the files of release `target` edited by hand (`meta/<id>.edited`: paths,
/// NUL-terminated), which a switch to it serves as edited.
fn edited_warning(target: &str, paths: &[u8]) -> Option<String> {
    let mut edited: Vec<String> = paths
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(manifest::display_path)
        .collect();
    edited.sort();
    edited.dedup();
    (!edited.is_empty()).then(|| {
        format!(
            "WARNING: {} file(s) of release {target} were edited or replaced by hand on the host \
             after it was deployed and are served as they are now: {}; deploy its commit again to \
             restore them",
            edited.len(),
            truncated(&edited).join(", ")
        )
    })
}

/// Run one of `remote`'s short scripts (the inventory's timeout); its failure is an error about
/// what it was `doing`, with what it printed.
async fn host_script(
    ctx: &StepCtx<'_>,
    script: &str,
    args: &[&str],
    doing: impl FnOnce() -> String,
) -> anyhow::Result<crate::ssh::Output> {
    let out = ctx
        .session
        .run_script(script, args, Some(INVENTORY_TIMEOUT))
        .await?;
    if !out.success() {
        bail!("{}: {} failed: {}", ctx.host.name(), doing(), out.tail());
    }
    Ok(out)
}

/// The manifest the host keeps of release `id`.
async fn release_manifest(ctx: &StepCtx<'_>, paths: &Paths, id: &str) -> anyhow::Result<Manifest> {
    let host = ctx.host.name();
    let out = host_script(ctx, remote::MANIFEST, &[&paths.store, id], || {
        format!("reading release {id} in {}", paths.store)
    })
    .await?;
    Manifest::decode(&out.stdout)
        .with_context(|| format!("{host}: the manifest of release {id} in {}", paths.store))
}

/// In place, a release comes back only from what the host has: nothing may need sending.
fn check_reapply(host: &str, id: &str, local: &Manifest, plan: &diff::Plan) -> anyhow::Result<()> {
    if !plan.send.is_empty() {
        let mut named: Vec<String> = plan
            .send
            .iter()
            .take(5)
            .map(|&i| local.entries[i].display())
            .collect();
        if plan.send.len() > named.len() {
            named.push(format!("and {} more", plan.send.len() - named.len()));
        }
        bail!(
            "{host}: {} file(s) of release {id} are no longer on the host (edited or removed by \
             hand after it was applied): {}; nothing was changed. Deploy that commit again instead",
            plan.send.len(),
            named.join(", ")
        );
    }
    Ok(())
}

/// Mode `in-place` rollback: apply release `id`'s manifest into `to` again, from what the host
/// has (the store's objects and the files in `to`); nothing is sent but the lists.
async fn reapply(
    ctx: &StepCtx<'_>,
    step: &SyncStep,
    paths: &Paths,
    id: &str,
) -> anyhow::Result<bool> {
    let host = ctx.host.name();
    let manifest = release_manifest(ctx, paths, id).await?;
    let src = async { Ok(Arc::new(Source::known(manifest))) };
    let (Opened { local, mut inv, .. }, mut proc) =
        open_deploy(ctx.session, paths, src, step, &ctx.stop, ctx.held).await?;
    let (plan, apply) = plan_for(step, &local, &mut inv, false);
    let apply = apply.expect("in-place");
    let settled = apply.write.is_empty() && apply.dirs.is_empty() && apply.gone.is_empty();
    if (inv.same || settled) && inv.live() == Some(id) {
        return finish_quietly(host, paths, proc).await.map(|()| false);
    }
    if let Err(e) = check_in_the_way(host, paths, step, Some(&apply))
        .and_then(|()| check_reapply(host, id, &local, &plan))
    {
        let _ = proc.finish().await;
        return Err(e);
    }
    let params = params_line(
        id,
        false,
        &[],
        &inv.drifted,
        true,
        false,
        !inv.excluded.is_empty(),
    );
    let name = paths.name().to_string();
    let build = move |out: archive::ChannelWriter, sent: &dyn Fn(u64)| {
        archive::write_in_place(
            std::path::Path::new("/nonexistent"),
            &name,
            &local,
            &apply,
            None,
            archive::Sink {
                out,
                sent,
                plain: false,
                compress_all: false,
                learn: false,
            },
        )
    };
    stream(ctx, proc, &params, 0, build, paths, None).await?;
    Ok(true)
}

pub async fn remove(ctx: &StepCtx<'_>, step: &SyncRemoveStep) -> anyhow::Result<StepReport> {
    let paths = target_paths(ctx.host, &step.to)?;
    if ctx.plan {
        return Ok(StepReport {
            step: "sync_remove".into(),
            changed: true,
            summary: format!("would remove {} and {}", paths.to, paths.store),
            ..Default::default()
        });
    }
    let out = host_script(ctx, remote::REMOVE, &[&paths.store, &paths.to], || {
        format!("removing {}", paths.to)
    })
    .await?;
    let log: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect();
    let done = out.stdout_str();
    let (link, store) = (
        done.contains("removed link"),
        done.contains("removed store"),
    );
    let summary = match (link, store) {
        (true, true) => format!("removed {} and its releases", paths.to),
        (true, false) => format!("removed {}", paths.to),
        (false, true) if done.contains("no target") => {
            format!("removed the releases of {} (it was already gone)", paths.to)
        }
        (false, true) => format!("removed the releases of {}; {0} left as it is", paths.to),
        (false, false) => format!("nothing to remove at {}", paths.to),
    };
    Ok(StepReport {
        step: "sync_remove".into(),
        changed: link || store,
        summary,
        log,
        ..Default::default()
    })
}

/// Read what is live at `step.to` on `host` (templates expanded with the host's variables).
pub async fn live(host: &Host, session: &Session, step: &SyncStep) -> anyhow::Result<LiveSync> {
    let paths = Paths::new(&host.path(&step.to)?)?;
    // In place, what changed by hand is judged against the live manifest (in the tail).
    let in_place = step.mode == SyncMode::InPlace;
    let mut inv = inventory(session, &paths, if in_place { "?" } else { "-" }, step).await?;
    if in_place && let Some(m) = inv.live_manifest.clone() {
        keep_excluded(step, &mut inv);
        inv.handmade = diff::in_place(
            &m,
            &inv.in_place_target(),
            &Default::default(),
            &[],
            step.delete,
        )
        .handmade;
    }
    let release = inv.live().map(str::to_string);
    let meta = release.as_ref().and_then(|r| inv.metas.get(r));
    let drift = match &inv.target {
        TargetState::Dir if inv.inplace.is_some() => inv.drift(),
        TargetState::Dir => Some(format!(
            "{} is a plain directory, not a ferry release",
            paths.to
        )),
        TargetState::Other => Some(format!("{} is not a directory", paths.to)),
        TargetState::Link { target, live: None } => Some(format!(
            "{} points to {target}, not a ferry release",
            paths.to
        )),
        TargetState::Link { live: Some(r), .. } if !inv.releases.contains(r) => Some(format!(
            "{} points to release {r}, which is missing",
            paths.to
        )),
        _ => inv.drift(),
    };
    Ok(LiveSync {
        path: paths.to,
        ref_name: meta.map(|m| m.ref_name.clone()),
        sha: meta.map(|m| m.sha.clone()),
        deployed_at: meta.map(|m| m.time),
        release,
        drift,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_of_one_host_may_not_nest() {
        let t =
            |v: &[&str]| super::disjoint("h", &v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(t(&["/var/www/shop", "/var/www/shop-origin", "/srv/app"]).is_ok());
        for bad in [
            ["/srv/app", "/srv/app/public"],
            ["/srv/app/public", "/srv/app"],
            ["/srv/app", "/srv/app"],
        ] {
            let e = t(&bad).unwrap_err().to_string();
            assert!(
                e.starts_with("h: sync targets") && e.contains("overlap"),
                "{e}"
            );
        }
    }
}
