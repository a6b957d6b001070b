//! The service container and accessories on one host: create, idempotent no-op, health-gated
//! replacement that keeps the previous container for rollback, rollback itself, removal, and the
//! read-only live view for `ferry status`.

use std::collections::BTreeMap;

use anyhow::{Context, bail};

use super::engine::{self, ContainerState, Engine, TRANSFER_TIMEOUT};
use super::spec::{self, Resolved, aside_name, older_name, prev_name};
use super::{LiveContainer, health, report, resolve, short_id};
use crate::deploy::{StepCtx, StepReport};
use crate::inventory::Host;
use crate::playbook::{ContainerSpec, DockerRemoveStep};
use crate::ssh::Session;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Replaced when the spec or the image behind its tag changes; health-gated, rollback kept.
    Service,
    /// Started if missing, replaced only when its spec changes.
    Accessory,
}

/// Make sure the engine has `image`, pulling first when the tag may have moved. Returns its id.
async fn ensure_image(
    engine: &Engine<'_>,
    image: &str,
    role: Role,
    log: &mut Vec<String>,
) -> anyhow::Result<String> {
    let local = engine.image_id(image).await?;
    let pinned = image.contains("@sha256:");
    if let Some(id) = &local
        && (pinned || role == Role::Accessory)
    {
        return Ok(id.clone());
    }
    let out = engine
        .raw(&["pull", "--", image], &[], Some(TRANSFER_TIMEOUT))
        .await?;
    if out.success() {
        let id = engine
            .image_id(image)
            .await?
            .with_context(|| format!("{}: pulled {image} but cannot see it", engine.host.name()))?;
        if local.as_deref() != Some(id.as_str()) {
            log.push(format!("pulled {image} ({})", short_id(&id)));
        }
        return Ok(id);
    }
    // A registry image that cannot be pulled is an error (a stale local copy would be deployed as
    // "up to date"); an image without a registry host may be one built on the host, unless the
    // local copy was pulled from that name's repository (Docker Hub's).
    let built_here = !spec::names_registry(image)
        && local.is_some()
        && !spec::pulled_from_own_repository(&engine.repo_digests(image).await?, image);
    match local.filter(|_| built_here) {
        Some(id) => {
            log.push(format!(
                "cannot pull {image} ({}); using the local image {}",
                out.tail().lines().last().unwrap_or_default(),
                short_id(&id)
            ));
            Ok(id)
        }
        None => bail!(
            "{}: cannot pull {image}: {}\n({})",
            engine.host.name(),
            out.tail(),
            super::image::registry_hint(&out.tail()).unwrap_or_else(|| {
                "is the name right, and did a docker_login step run for its registry?".into()
            })
        ),
    }
}

/// Refuse to replace a container that ferry did not start for this app and environment (one run
/// by hand or by another tool, another app's): `adopt: true` takes it over.
fn not_ours(ctx: &StepCtx<'_>, name: &str, c: &ContainerState) -> anyhow::Result<()> {
    let Some(whose) = whose(ctx, c) else {
        return Ok(());
    };
    bail!(
        "{}: a container named {name} exists {whose}; ferry will not replace it unless told to. \
         Set `adopt: true` on this step to take it over (it is stopped and kept as \
         {prev}, for a rollback), or give the step another name",
        ctx.host.name(),
        prev = prev_name(name)
    )
}

/// Whose a container is, unless ferry started it for this app and environment (`None`).
fn whose(ctx: &StepCtx<'_>, c: &ContainerState) -> Option<String> {
    let label = |k: &str| c.labels.get(k).map(String::as_str);
    match (label("ferry.app"), label("ferry.env")) {
        (Some(app), Some(env)) if app == ctx.app && env == ctx.env => None,
        (Some(app), env) => Some(format!(
            "that ferry started for app {} (environment {})",
            crate::shell::quote_str(app),
            crate::shell::quote_str(env.unwrap_or("?"))
        )),
        (None, _) => Some("that ferry did not start (it has no ferry.app label)".to_string()),
    }
}

fn ferry_labels(ctx: &StepCtx<'_>, hash: &str) -> BTreeMap<String, String> {
    [
        ("ferry.app", ctx.app),
        ("ferry.env", ctx.env),
        ("ferry.ref", ctx.deploy.ref_name.as_str()),
        ("ferry.sha", ctx.deploy.sha.as_str()),
        ("ferry.release", ctx.release),
        ("ferry.spec", hash),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A deploy cut off between "moved aside" and "kept as previous" (killed, its connection lost)
/// leaves `NAME.ferry-aside`, the container that was live: it comes back under NAME with
/// `restart` (the spec's policy), and what stands under NAME (that deploy's new container, never
/// found healthy) goes. (A run that could not keep the old container after a healthy switch
/// removes it, so this never undoes one.)
async fn recover_aside(
    engine: &Engine<'_>,
    name: &str,
    restart: &str,
    log: &mut Vec<String>,
) -> anyhow::Result<()> {
    let aside = aside_name(name);
    if engine.container(&aside).await?.is_none() {
        return Ok(());
    }
    if engine.remove(name).await? {
        log.push(format!(
            "removed {name}, which an interrupted deploy had started and never found healthy"
        ));
    }
    engine.rename(&aside, name).await?;
    unpark(engine, name, restart).await?;
    engine.start(name).await?;
    log.push(format!(
        "restored {name} from {aside} (left by an interrupted deploy)"
    ));
    Ok(())
}

/// A restart policy under which the daemon starts a container by itself (`always` even one that
/// was stopped, when the daemon starts).
fn restarts(policy: &str) -> bool {
    !policy.is_empty() && policy != "no"
}

/// Keep a container that is moved aside or kept as the previous one from being started again by
/// the daemon (beside the live one, after a reboot) while it waits: its policy becomes `no`.
async fn park(engine: &Engine<'_>, name: &str, policy: &str, log: &mut Vec<String>) {
    if restarts(policy)
        && let Err(e) = engine.set_restart(name, "no").await
    {
        log.push(format!(
            "warning: cannot clear the restart policy of {name} ({e}); a restart of docker would start it again"
        ));
    }
}

/// Give a container that goes live again its restart policy.
async fn unpark(engine: &Engine<'_>, name: &str, policy: &str) -> Result<(), engine::DockerError> {
    if restarts(policy) {
        engine.set_restart(name, policy).await?;
    }
    Ok(())
}

/// After a revert: the container the reverted run started (moved aside) goes, and the one kept
/// before that run becomes `prev` again; says how it went, for the log.
async fn drop_undone(engine: &Engine<'_>, aside: &str, prev: &str, older: &str) -> String {
    let undo = async {
        engine.remove(aside).await?;
        let kept = engine.container(older).await?.is_some();
        if kept {
            engine.rename(older, prev).await?;
        }
        Ok::<_, engine::DockerError>(kept)
    };
    match undo.await {
        Ok(true) => format!("removed the reverted container; {older} is kept as {prev} again"),
        Ok(false) => "removed the reverted container".into(),
        Err(e) => format!(
            "warning: cannot remove the reverted container {aside} or keep {older} as {prev} again ({e})"
        ),
    }
}

/// The restart policy the spec asks for (docker's default: `no`).
fn policy(r: &Resolved) -> &str {
    r.spec.restart.as_deref().unwrap_or("no")
}

/// After a healthy switch: keep the container moved aside as `prev`. The one kept there before
/// waits as `older` (when given) until the run succeeds ([`commit`]) or is reverted ([`revert`]
/// makes it `prev` again), else goes. Should keeping fail, the container moved aside is removed (a
/// `NAME.ferry-aside` left beside a live NAME would pass for an interrupted deploy's); says how it
/// went, for the log.
async fn keep_aside(engine: &Engine<'_>, aside: &str, prev: &str, older: Option<&str>) -> String {
    let keep = async {
        match older {
            Some(older) if engine.container(prev).await?.is_some() => {
                engine.remove(older).await?;
                engine.rename(prev, older).await?;
            }
            _ => {
                engine.remove(prev).await?;
            }
        }
        engine.rename(aside, prev).await
    };
    match keep.await {
        Ok(()) => format!("kept the replaced container as {prev}"),
        Err(e) => match engine.remove(aside).await {
            Ok(_) => format!(
                "warning: cannot keep the replaced container as {prev} ({e}); it was removed, so \
                 no container is kept for a rollback"
            ),
            Err(e2) => format!(
                "warning: cannot keep the replaced container as {prev} ({e}) nor remove it ({e2}); \
                 remove {aside} by hand, or the next deploy takes it for an interrupted one's and \
                 brings it back"
            ),
        },
    }
}

pub(crate) async fn run(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    spec: &ContainerSpec,
    role: Role,
) -> anyhow::Result<StepReport> {
    let kind = match role {
        Role::Service => "container",
        Role::Accessory => "accessory",
    };
    let r = resolve(ctx.host, spec)?;
    let hash = r.hash();
    let name = r.spec.name.clone();
    let image = r.spec.image.clone();
    let mut log = Vec::new();
    let mut current = None;
    // A plan: what the run would find once it put back what a cut run moved aside.
    let mut restoring = String::new();
    if !ctx.plan {
        recover_aside(engine, &name, policy(&r), &mut log).await?;
    } else if let Some(c) = engine.container(&aside_name(&name)).await? {
        restoring = format!(
            "restore {name} from {} (left by an interrupted deploy; the container that run \
             started goes), then ",
            aside_name(&name)
        );
        current = Some(c);
    }
    let current = match current {
        Some(c) => Some(c),
        None => engine.container(&name).await?,
    };
    if let Some(c) = &current
        && !r.spec.adopt
    {
        not_ours(ctx, &name, c)?;
    }
    let image_id = if ctx.plan {
        engine.image_id(&image).await?
    } else {
        // The step finishes once it switches; a pull (up to half an hour) before that stops.
        tokio::select! {
            biased;
            _ = crate::deploy::interrupted(&ctx.stop) => bail!(
                "{}: interrupted (SIGINT/SIGTERM) while pulling {image}; {name} was not touched",
                ctx.host.name()
            ),
            id = ensure_image(engine, &image, role, &mut log) => Some(id?),
        }
    };
    let spec_same = current
        .as_ref()
        .is_some_and(|c| c.labels.get("ferry.spec") == Some(&hash));
    let image_same = current
        .as_ref()
        .is_some_and(|c| Some(&c.image_id) == image_id.as_ref());
    let matches = spec_same && (role == Role::Accessory || image_same);
    let shown = r.shown_hash();
    let detail = serde_json::json!({
        "name": name, "image": image, "image_id": image_id, "spec": shown,
    });
    if matches {
        let c = current.as_ref().expect("matched a container");
        if c.running {
            let mut rep = report(
                kind,
                false,
                format!("{name} up to date ({image}, spec {shown})"),
                log,
            );
            rep.detail = detail;
            return Ok(rep);
        }
        if ctx.plan {
            return Ok(report(
                kind,
                true,
                format!("would {restoring}start {name} (stopped, spec unchanged)"),
                log,
            ));
        }
        engine.start(&name).await?;
        let how = health::wait(engine, &name, r.spec.health.as_ref())
            .await
            .with_context(|| format!("{}: started {name}", ctx.host.name()))?;
        let mut rep = report(
            kind,
            true,
            format!("started {name} (was stopped, spec unchanged; {how})"),
            log,
        );
        rep.detail = detail;
        return Ok(rep);
    }
    let why = match &current {
        None => "first deploy of this name".to_string(),
        Some(_) if !spec_same => "spec changed".to_string(),
        Some(_) => match &image_id {
            Some(id) => format!("image {image} now is {}", short_id(id)),
            None => format!("image {image} to be pulled"),
        },
    };
    if ctx.plan {
        let verb = if current.is_some() {
            "replace"
        } else {
            "create"
        };
        let mut rep = report(
            kind,
            true,
            format!("would {restoring}{verb} {name} with {image} ({why})"),
            log,
        );
        rep.detail = detail;
        return Ok(rep);
    }
    let how = replace(ctx, engine, &r, role, current.as_ref(), &mut log).await?;
    let verb = if current.is_some() {
        "replaced"
    } else {
        "created"
    };
    let mut rep = report(
        kind,
        true,
        format!("{verb} {name} with {image} ({why}); {how}"),
        log,
    );
    rep.detail = detail;
    // (What a failed run takes back; starting a stopped container is no switch.)
    rep.detail["switched"] = true.into();
    Ok(rep)
}

/// Write the secrets env file (0600) on the host, from stdin; returns its path.
async fn write_secret_file(ctx: &StepCtx<'_>, r: &Resolved) -> anyhow::Result<Option<String>> {
    let Some(body) = r.secret_env_file() else {
        return Ok(None);
    };
    let dir = format!("{}/docker", ctx.host.state_dir());
    let file = format!("{dir}/{}.{}.env", r.spec.name, ctx.release);
    // Also sweeps env files of this container left by a run that was killed before removing them:
    // `NAME.<release id>.env` only (ids start with the date), never `NAME.worker.<id>.env`.
    let cmd = Session::script_command(
        "set -e; umask 077; mkdir -p -- \"$1\"; rm -f -- \"$1/$3\".[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T*.env; cat > \"$2\"",
        &[&dir, &file, &r.spec.name],
    )
    .map_err(|_| anyhow::anyhow!("NUL byte in a path"))?;
    let mut p = ctx.session.spawn(&cmd, None).await?;
    p.write(body.as_bytes())
        .await
        .context("sending secret env file")?;
    let out = p.finish().await?;
    if !out.success() {
        bail!(
            "{}: cannot write the secret env file {file}: {}",
            ctx.host.name(),
            out.tail()
        );
    }
    Ok(Some(file))
}

/// Move `current` aside, create and start the new container, wait for health; undo on failure.
async fn replace(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    r: &Resolved,
    role: Role,
    current: Option<&ContainerState>,
    log: &mut Vec<String>,
) -> anyhow::Result<String> {
    let host = ctx.host.name();
    let name = r.spec.name.as_str();
    let aside = aside_name(name);
    let prev = prev_name(name);
    let was_running = current.is_some_and(|c| c.running);
    let restart = current.map_or("", |c| c.restart.as_str());
    if current.is_some() {
        engine.rename(name, &aside).await?;
        if was_running
            // Free its ports for the new one.
            && let Err(e) = engine.stop(&aside).await
        {
            let back = put_back(engine, &aside, name, true, restart).await;
            bail!("{host}: cannot stop {name} to replace it: {e}{back}");
        }
        park(engine, &aside, restart, log).await;
    }
    let labels = ferry_labels(ctx, &r.hash());
    let outcome: anyhow::Result<String> = async {
        let secret_file = write_secret_file(ctx, r).await?;
        let args = r.create_args(&labels, secret_file.as_deref());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let created = engine.run(&argv, None).await;
        if let Some(f) = &secret_file {
            // Docker keeps the values in the container's config; the file is no longer needed.
            let _ = ctx.session.run(&["rm", "-f", "--", f], None).await;
        }
        created?;
        engine.start(name).await?;
        // A cancelled job (SIGTERM, then SIGKILL seconds later) does not wait out the health
        // check: the new container goes and the old one comes back, as for a failed check.
        tokio::select! {
            how = health::wait(engine, name, r.spec.health.as_ref()) => Ok(how?),
            _ = crate::deploy::interrupted(&ctx.stop) => Err(anyhow::anyhow!(
                "interrupted (SIGINT/SIGTERM) while waiting for it to be healthy"
            )),
        }
    }
    .await;
    match outcome {
        Ok(how) => {
            if current.is_some() {
                // The new container is live; failing to file the old one away is only a warning.
                // (A failed run takes back only service containers: an accessory's `prev` can go
                // at once, not wait as `older` for a success.)
                let older = older_name(name);
                let older = (role == Role::Service).then_some(older.as_str());
                log.push(keep_aside(engine, &aside, &prev, older).await);
            }
            Ok(how)
        }
        Err(e) => {
            // The connection lost: nothing more can be done or known there. The next deploy or
            // rollback puts back what was moved aside (`recover_aside`).
            let alive = ctx
                .session
                .run(&["true"], Some(std::time::Duration::from_secs(10)))
                .await
                .is_ok();
            if !alive {
                let back = match current {
                    Some(_) => format!(
                        "; the next deploy or rollback removes it and brings back {aside}, the \
                         container that was live"
                    ),
                    None => String::new(),
                };
                return Err(anyhow::anyhow!(
                    "{host}: the connection was lost while the new container {name} ({}) was \
                     being started or checked: it was left as it was{back}: {e:#}",
                    r.spec.image
                ));
            }
            let logs = if engine.container(name).await.ok().flatten().is_some() {
                engine.logs(name).await
            } else {
                vec![]
            };
            let removed = match engine.remove(name).await {
                Ok(_) => "was removed".to_string(),
                Err(e) => {
                    format!("could not be removed ({e}; the next deploy or rollback removes it)")
                }
            };
            let restored = if current.is_some() {
                put_back(engine, &aside, name, was_running, restart).await
            } else {
                String::new()
            };
            let logs = if logs.is_empty() {
                String::new()
            } else {
                format!("\nlogs of the new container:\n  {}", logs.join("\n  "))
            };
            Err(masked(
                r,
                format!(
                    "{host}: new container {name} ({}) failed and {removed}{restored}: {e:#}{logs}",
                    r.spec.image
                ),
            ))
        }
    }
}

/// An error whose text may hold a container's logs: its secrets masked (a container may print
/// them), as a `run` step's output is.
fn masked(r: &Resolved, text: String) -> anyhow::Error {
    anyhow::anyhow!(crate::report::mask(
        &text,
        r.secrets.values().map(String::as_str)
    ))
}

/// Put the container moved aside back under `name`, with its restart policy `restart`; says how
/// that went, for the error message. If it fails, the container stays as `aside` and the next
/// deploy restores it ([`recover_aside`]).
async fn put_back(
    engine: &Engine<'_>,
    aside: &str,
    name: &str,
    start: bool,
    restart: &str,
) -> String {
    let back = async {
        engine.rename(aside, name).await?;
        unpark(engine, name, restart).await?;
        if start {
            engine.start(name).await?;
        }
        Ok::<_, engine::DockerError>(())
    };
    match back.await {
        Ok(()) => format!("; the previous {name} is back"),
        Err(e) => format!(
            "; putting the previous container back FAILED ({e}): it is kept as {aside} and the next \
             deploy restores it"
        ),
    }
}

/// Bring back the container that was live at the rollback's target release (`ctx.release`): of
/// the current container and the one kept as `NAME.ferry-prev`, the newest made at or before that
/// release (each carries the release that made it in its `ferry.release` label). If that is the
/// current one, nothing changes; if it is the kept one, the two swap, so a second rollback can undo
/// the first; if neither, the container of that release is gone and the step says so.
pub async fn rollback(ctx: &StepCtx<'_>, spec: &ContainerSpec) -> anyhow::Result<StepReport> {
    swap_back(ctx, spec, false, |made| made <= ctx.release).await
}

/// Undo this run's switch of the service container (its release is `ctx.release`): bring back the
/// container it replaced, kept as `NAME.ferry-prev`, as [`rollback`] does; the new one goes, and
/// the one kept before the run (`NAME.ferry-older`) is kept as `NAME.ferry-prev` again. Nothing
/// changes when this run did not replace it.
pub async fn revert(ctx: &StepCtx<'_>, spec: &ContainerSpec) -> anyhow::Result<StepReport> {
    swap_back(ctx, spec, true, |made| made < ctx.release).await
}

/// After a successful run that replaced the service container: the container kept for rollback
/// before it (`NAME.ferry-older`) goes.
pub async fn commit(ctx: &StepCtx<'_>, spec: &ContainerSpec) -> anyhow::Result<()> {
    let engine = Engine::new(ctx.host, ctx.session);
    let name = resolve(ctx.host, spec)?.spec.name;
    engine.remove(&older_name(&name)).await?;
    Ok(())
}

/// [`rollback`] to the newest container whose `ferry.release` label passes `live`; `undo`: this
/// run's own switch ([`revert`]).
async fn swap_back(
    ctx: &StepCtx<'_>,
    spec: &ContainerSpec,
    undo: bool,
    live: impl Fn(&str) -> bool,
) -> anyhow::Result<StepReport> {
    let engine = Engine::new(ctx.host, ctx.session);
    let host = ctx.host.name();
    let r = resolve(ctx.host, spec)?;
    let name = r.spec.name.as_str();
    let (prev, aside) = (prev_name(name), aside_name(name));
    let mut log = Vec::new();
    if !ctx.plan {
        recover_aside(&engine, name, policy(&r), &mut log).await?;
    }
    let current = engine.container(name).await?;
    let kept = engine.container(&prev).await?;
    let made = |c: &Option<ContainerState>| {
        c.as_ref()
            .and_then(|c| c.labels.get("ferry.release").cloned())
            .filter(|r| live(r))
    };
    match (made(&current), made(&kept)) {
        (Some(c), k) if k.as_ref().is_none_or(|k| *k <= c) => {
            return Ok(report(
                "container",
                false,
                format!(
                    "{name} already runs the container of release {c}, live at release {}",
                    ctx.release
                ),
                log,
            ));
        }
        (_, Some(_)) => {}
        (_, None) if kept.is_none() => bail!(
            "{host}: no previous container {prev} is kept, so there is nothing to roll back to \
             (one is kept after each successful update)"
        ),
        (_, None) => bail!(
            "{host}: the container that was live at release {} is gone: {name} and the kept \
             {prev} were both made later; deploy that commit again instead",
            ctx.release
        ),
    }
    let kept = kept.expect("a kept container: checked above");
    if ctx.plan {
        return Ok(report(
            "container",
            true,
            format!(
                "would switch {name} back to {} ({})",
                kept.image,
                kept.labels.get("ferry.ref").map_or("?", String::as_str)
            ),
            vec![],
        ));
    }
    let was_running = current.as_ref().is_some_and(|c| c.running);
    let restart = current.as_ref().map_or("", |c| c.restart.as_str());
    if current.is_some() {
        engine.rename(name, &aside).await?;
        if was_running && let Err(e) = engine.stop(&aside).await {
            let back = put_back(&engine, &aside, name, true, restart).await;
            bail!("{host}: cannot stop {name} to roll back: {e}{back}");
        }
        park(&engine, &aside, restart, &mut log).await;
    }
    if let Err(e) = engine.rename(&prev, name).await {
        let back = match current {
            Some(_) => put_back(&engine, &aside, name, was_running, restart).await,
            None => String::new(),
        };
        bail!("{host}: cannot bring {prev} back as {name}: {e}{back}");
    }
    let outcome: anyhow::Result<String> = async {
        unpark(&engine, name, policy(&r)).await?;
        engine.start(name).await?;
        Ok(health::wait(&engine, name, r.spec.health.as_ref()).await?)
    }
    .await;
    match outcome {
        Ok(how) => {
            if current.is_some() && undo {
                log.push(drop_undone(&engine, &aside, &prev, &older_name(name)).await);
            } else if current.is_some() {
                log.push(keep_aside(&engine, &aside, &prev, None).await);
            }
            Ok(report(
                "container",
                true,
                format!(
                    "rolled {name} back to {} ({}); {how}",
                    kept.image,
                    kept.labels.get("ferry.ref").map_or("?", String::as_str)
                ),
                log,
            ))
        }
        Err(e) => {
            let logs = engine.logs(name).await;
            let _ = engine.stop(name).await;
            park(&engine, name, policy(&r), &mut Vec::new()).await;
            let kept_back = match engine.rename(name, &prev).await {
                Ok(()) => String::new(),
                Err(e) => format!(" (and it could not be renamed back to {prev}: {e})"),
            };
            let back = match current {
                Some(_) => put_back(&engine, &aside, name, was_running, restart).await,
                None => String::new(),
            };
            Err(masked(
                &r,
                format!(
                    "{host}: the previous container did not come back healthy{kept_back}{back}: \
                     {e:#}\nits logs:\n  {}",
                    logs.join("\n  ")
                ),
            ))
        }
    }
}

/// Read what runs as `spec.name` on `host` (templates expanded with the host's variables).
pub async fn live(
    host: &Host,
    session: &Session,
    spec: &ContainerSpec,
) -> anyhow::Result<LiveContainer> {
    // Status needs only the name: not the secrets, nor the variables of the other fields (a
    // deploy's `${env.X}`, which the status job may not have).
    let name = spec::with_overrides(spec, host.name())
        .map_err(anyhow::Error::from)
        .and_then(|s| Ok(host.template(&s.name)?))
        .with_context(|| format!("{}: container `{}`", host.name(), spec.name))?;
    let engine = Engine::new(host, session);
    let aside = engine.container(&aside_name(&name)).await?.is_some();
    Ok(match engine.container(&name).await? {
        None => LiveContainer {
            name,
            aside,
            ..Default::default()
        },
        Some(c) => LiveContainer {
            name,
            exists: true,
            running: c.running,
            health: c.health,
            image: Some(c.image),
            ref_name: c.labels.get("ferry.ref").cloned(),
            sha: c.labels.get("ferry.sha").cloned(),
            release: c.labels.get("ferry.release").cloned(),
            aside,
        },
    })
}

pub(crate) async fn remove(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerRemoveStep,
) -> anyhow::Result<StepReport> {
    let name = ctx.host.expand(&s.name)?;
    let names = [
        name.clone(),
        prev_name(&name),
        aside_name(&name),
        older_name(&name),
    ];
    let mut present = Vec::new();
    for n in &names {
        let Some(c) = engine.container(n).await? else {
            continue;
        };
        // (The suffixed names are ferry's own renames: an adopted container's `.ferry-prev` keeps
        // its old labels.)
        if *n == name
            && let Some(whose) = whose(ctx, &c)
        {
            bail!(
                "{}: a container named {name} exists {whose}; docker_remove removes only \
                 containers ferry started for app {} in environment {}, so it is left alone \
                 (nothing was removed). Remove it by hand (docker rm -f {name}) if it must go, \
                 or fix the step's name",
                ctx.host.name(),
                crate::shell::quote_str(ctx.app),
                crate::shell::quote_str(ctx.env),
            );
        }
        present.push(n.clone());
    }
    if present.is_empty() {
        return Ok(report(
            "docker_remove",
            false,
            format!("{name} is not there"),
            vec![],
        ));
    }
    if ctx.plan {
        return Ok(report(
            "docker_remove",
            true,
            format!("would remove {}", present.join(", ")),
            vec![],
        ));
    }
    for n in &present {
        engine.remove(n).await?;
    }
    Ok(report(
        "docker_remove",
        true,
        format!("removed {}", present.join(", ")),
        vec![],
    ))
}
