//! Docker on the hosts, through the `docker` CLI over SSH: the container steps of a playbook
//! (login, service container, accessories, build, tag, push, pull, prune, remove) and rollback.
//!
//! Every container ferry starts carries labels: `ferry.app`, `ferry.env`, `ferry.ref`, `ferry.sha`,
//! `ferry.release` and `ferry.spec` (hash of the resolved spec), so that status and idempotence
//! checks read facts from the host rather than guess.
//!
//! A service container update: pull, move the old container aside (`NAME.ferry-aside`, stopped so it
//! releases its ports), create and start the new one, wait for health. On success the old one is
//! kept stopped as `NAME.ferry-prev` for `ferry rollback` (replacing the one kept before); on failure
//! the new one's logs are shown, it is removed and the old one is renamed back and started.
//! Downtime is the time from stopping the old container to the new one being healthy.

pub mod engine;
pub mod health;
pub mod prune;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::deploy::{StepCtx, StepReport};
use crate::inventory::Host;
use crate::playbook::{
    ContainerSpec, DockerBuildStep, DockerLoginStep, DockerPruneStep, DockerRemoveStep,
    DockerTagStep, ImageStep, Step,
};
use crate::ssh::Session;
use engine::{ContainerState, Engine};
use spec::{Resolved, aside_name, prev_name};

/// Pulls and pushes move whole images: give them room.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What runs under one container name on one host, for `ferry status` (read-only).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LiveContainer {
    pub name: String,
    /// False when no container of that name exists.
    pub exists: bool,
    pub running: bool,
    /// Docker's health status (`healthy`, `unhealthy`, `starting`) when the image has a check.
    pub health: Option<String>,
    pub image: Option<String>,
    /// From ferry's labels on the container.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    pub sha: Option<String>,
    pub release: Option<String>,
}

/// Run one docker step on the host of `ctx` (with `ctx.plan`, only say what would happen).
pub async fn run(ctx: &StepCtx<'_>, step: &Step) -> anyhow::Result<StepReport> {
    let engine = Engine::new(ctx.host, ctx.session);
    match step {
        Step::DockerLogin(s) => login(ctx, &engine, s).await,
        Step::Container(c) => container(ctx, &engine, c, Role::Service).await,
        Step::Accessory(c) => container(ctx, &engine, c, Role::Accessory).await,
        Step::DockerBuild(s) => build(ctx, &engine, s).await,
        Step::DockerTag(s) => tag(ctx, &engine, s).await,
        Step::DockerPush(s) => push(ctx, &engine, s).await,
        Step::DockerPull(s) => pull_step(ctx, &engine, s).await,
        Step::DockerPrune(s) => prune_step(ctx, &engine, s).await,
        Step::DockerRemove(s) => remove_step(ctx, &engine, s).await,
        other => bail!("{} is not a docker step", other.kind()),
    }
}

fn report(step: &str, changed: bool, summary: String, log: Vec<String>) -> StepReport {
    StepReport {
        step: step.into(),
        changed,
        summary,
        log,
        ..Default::default()
    }
}

/// The spec for this host, with secrets read from the controller's environment.
fn resolve(host: &Host, spec: &ContainerSpec) -> anyhow::Result<Resolved> {
    spec::resolve(spec, host.name(), &|s| host.expand(s), &|k| {
        std::env::var(k).ok()
    })
    .with_context(|| format!("{}: container `{}`", host.name(), spec.name))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Replaced when the spec or the image behind its tag changes; health-gated, rollback kept.
    Service,
    /// Started if missing, replaced only when its spec changes.
    Accessory,
}

async fn login(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerLoginStep,
) -> anyhow::Result<StepReport> {
    let host = ctx.host.name();
    let registry = ctx.host.expand(&s.registry)?;
    let user = ctx.host.expand(&s.user)?;
    let password = std::env::var(&s.password_env)
        .ok()
        .filter(|p| !p.is_empty());
    let Some(password) = password else {
        bail!(
            "{host}: docker_login to {registry}: environment variable {} is not set; it must hold \
             the password of `{user}` (a masked CI/CD variable)",
            s.password_env
        );
    };
    if ctx.plan {
        return Ok(report(
            "docker_login",
            false,
            format!("would log in to {registry} as {user}"),
            vec![],
        ));
    }
    let args = [
        "login",
        "--username",
        &user,
        "--password-stdin",
        "--",
        &registry,
    ];
    let out = engine
        .raw(&args, password.as_bytes(), Some(Duration::from_secs(120)))
        .await?;
    if !out.success() {
        // Docker does not echo the password, but never trust output with a secret in play.
        let tail = out.tail().replace(&password, "***");
        bail!(
            "{host}: docker login to {registry} as `{user}` failed: {tail}\n(check the password in \
             {} and that `{user}` may log in to {registry})",
            s.password_env
        );
    }
    Ok(report(
        "docker_login",
        false,
        format!("logged in to {registry} as {user}"),
        vec![],
    ))
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
    // "up to date"); an image without a registry host may be one built on the host.
    match local.filter(|_| !spec::names_registry(image)) {
        Some(id) => {
            log.push(format!(
                "cannot pull {image} ({}); using the local image {}",
                out.tail().lines().last().unwrap_or_default(),
                short_id(&id)
            ));
            Ok(id)
        }
        None => bail!(
            "{}: cannot pull {image}: {}\n(is the name right, and did a docker_login step run for \
             its registry?)",
            engine.host.name(),
            out.tail()
        ),
    }
}

fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
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

/// A crash between "moved aside" and "kept as previous" leaves `NAME.ferry-aside`: put it back if
/// nothing took its name, else drop it (the newer container under NAME wins).
async fn recover_aside(
    engine: &Engine<'_>,
    name: &str,
    log: &mut Vec<String>,
) -> anyhow::Result<()> {
    let aside = aside_name(name);
    if engine.container(&aside).await?.is_none() {
        return Ok(());
    }
    if engine.container(name).await?.is_none() {
        engine.rename(&aside, name).await?;
        engine.start(name).await?;
        log.push(format!(
            "restored {name} from {aside} (left by an interrupted deploy)"
        ));
    } else {
        engine.remove(&aside).await?;
        log.push(format!("removed {aside} left by an interrupted deploy"));
    }
    Ok(())
}

async fn container(
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
    if !ctx.plan {
        recover_aside(engine, &name, &mut log).await?;
    }
    let current = engine.container(&name).await?;
    let image_id = if ctx.plan {
        engine.image_id(&image).await?
    } else {
        Some(ensure_image(engine, &image, role, &mut log).await?)
    };
    let spec_same = current
        .as_ref()
        .is_some_and(|c| c.labels.get("ferry.spec") == Some(&hash));
    let image_same = current
        .as_ref()
        .is_some_and(|c| Some(&c.image_id) == image_id.as_ref());
    let matches = spec_same && (role == Role::Accessory || image_same);
    let detail = serde_json::json!({
        "name": name, "image": image, "image_id": image_id, "spec": hash,
    });
    if matches {
        let c = current.as_ref().expect("matched a container");
        if c.running {
            let mut rep = report(
                kind,
                false,
                format!("{name} up to date ({image}, spec {hash})"),
                log,
            );
            rep.detail = detail;
            return Ok(rep);
        }
        if ctx.plan {
            return Ok(report(
                kind,
                true,
                format!("would start {name} (stopped, spec unchanged)"),
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
            format!("would {verb} {name} with {image} ({why})"),
            log,
        );
        rep.detail = detail;
        return Ok(rep);
    }
    let how = replace(ctx, engine, &r, current.as_ref(), &mut log).await?;
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
    Ok(rep)
}

/// Write the secrets env file (0600) on the host, from stdin; returns its path.
async fn write_secret_file(ctx: &StepCtx<'_>, r: &Resolved) -> anyhow::Result<Option<String>> {
    let Some(body) = r.secret_env_file() else {
        return Ok(None);
    };
    let dir = format!("{}/docker", ctx.host.state_dir());
    let file = format!("{dir}/{}.{}.env", r.spec.name, ctx.release);
    // Also sweeps env files of this container left by a run that was killed before removing them.
    let cmd = Session::script_command(
        "set -e; umask 077; mkdir -p -- \"$1\"; rm -f -- \"$1/$3\".*.env; cat > \"$2\"",
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
    current: Option<&ContainerState>,
    log: &mut Vec<String>,
) -> anyhow::Result<String> {
    let host = ctx.host.name();
    let name = r.spec.name.as_str();
    let aside = aside_name(name);
    let prev = prev_name(name);
    let was_running = current.is_some_and(|c| c.running);
    if current.is_some() {
        engine.rename(name, &aside).await?;
        if was_running
            // Free its ports for the new one.
            && let Err(e) = engine.stop(&aside).await
        {
            let back = put_back(engine, &aside, name, true).await;
            bail!("{host}: cannot stop {name} to replace it: {e}{back}");
        }
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
        Ok(health::wait(engine, name, r.spec.health.as_ref()).await?)
    }
    .await;
    match outcome {
        Ok(how) => {
            if current.is_some() {
                // The new container is live; failing to file the old one away is only a warning.
                let keep = async {
                    engine.remove(&prev).await?;
                    engine.rename(&aside, &prev).await
                };
                log.push(match keep.await {
                    Ok(()) => format!("kept the previous container as {prev}"),
                    Err(e) => format!(
                        "warning: cannot keep the previous container as {prev} ({e}); it stays as {aside}"
                    ),
                });
            }
            Ok(how)
        }
        Err(e) => {
            let logs = if engine.container(name).await.ok().flatten().is_some() {
                engine.logs(name).await
            } else {
                vec![]
            };
            let _ = engine.remove(name).await;
            let restored = if current.is_some() {
                put_back(engine, &aside, name, was_running).await
            } else {
                String::new()
            };
            let logs = if logs.is_empty() {
                String::new()
            } else {
                format!("\nlogs of the new container:\n  {}", logs.join("\n  "))
            };
            bail!(
                "{host}: new container {name} ({}) failed and was removed{restored}: {e:#}{logs}",
                r.spec.image
            )
        }
    }
}

/// Put the container moved aside back under `name`; says how that went, for the error message.
/// If it fails, the container stays as `aside` and the next deploy restores it ([`recover_aside`]).
async fn put_back(engine: &Engine<'_>, aside: &str, name: &str, start: bool) -> String {
    let back = async {
        engine.rename(aside, name).await?;
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

/// Bring back the container kept as `NAME.ferry-prev`; the current one becomes the kept one, so a
/// second rollback undoes the first.
pub async fn rollback(ctx: &StepCtx<'_>, spec: &ContainerSpec) -> anyhow::Result<StepReport> {
    let engine = Engine::new(ctx.host, ctx.session);
    let host = ctx.host.name();
    let r = resolve(ctx.host, spec)?;
    let name = r.spec.name.as_str();
    let (prev, aside) = (prev_name(name), aside_name(name));
    let Some(kept) = engine.container(&prev).await? else {
        bail!(
            "{host}: no previous container {prev} is kept, so there is nothing to roll back to \
             (one is kept after each successful update)"
        );
    };
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
    let mut log = Vec::new();
    recover_aside(&engine, name, &mut log).await?;
    let current = engine.container(name).await?;
    let was_running = current.as_ref().is_some_and(|c| c.running);
    if current.is_some() {
        engine.rename(name, &aside).await?;
        if was_running && let Err(e) = engine.stop(&aside).await {
            let back = put_back(&engine, &aside, name, true).await;
            bail!("{host}: cannot stop {name} to roll back: {e}{back}");
        }
    }
    if let Err(e) = engine.rename(&prev, name).await {
        let back = match current {
            Some(_) => put_back(&engine, &aside, name, was_running).await,
            None => String::new(),
        };
        bail!("{host}: cannot bring {prev} back as {name}: {e}{back}");
    }
    let outcome: anyhow::Result<String> = async {
        engine.start(name).await?;
        Ok(health::wait(&engine, name, r.spec.health.as_ref()).await?)
    }
    .await;
    match outcome {
        Ok(how) => {
            if current.is_some() {
                log.push(match engine.rename(&aside, &prev).await {
                    Ok(()) => format!("kept the replaced container as {prev}"),
                    Err(e) => format!(
                        "warning: cannot keep the replaced container as {prev} ({e}); it stays as {aside}"
                    ),
                });
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
            let kept_back = match engine.rename(name, &prev).await {
                Ok(()) => String::new(),
                Err(e) => format!(" (and it could not be renamed back to {prev}: {e})"),
            };
            let back = match current {
                Some(_) => put_back(&engine, &aside, name, was_running).await,
                None => String::new(),
            };
            bail!(
                "{host}: the previous container did not come back healthy{kept_back}{back}: \
                 {e:#}\nits logs:\n  {}",
                logs.join("\n  ")
            )
        }
    }
}

/// Read what runs as `spec.name` on `host` (templates expanded with the host's variables).
pub async fn live(
    host: &Host,
    session: &Session,
    spec: &ContainerSpec,
) -> anyhow::Result<LiveContainer> {
    // Status needs no secrets: resolve with placeholder values.
    let r = spec::resolve(spec, host.name(), &|s| host.expand(s), &|_| {
        Some(String::new())
    })
    .with_context(|| format!("{}: container `{}`", host.name(), spec.name))?;
    let engine = Engine::new(host, session);
    let name = r.spec.name;
    Ok(match engine.container(&name).await? {
        None => LiveContainer {
            name,
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
        },
    })
}

async fn build(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerBuildStep,
) -> anyhow::Result<StepReport> {
    let context = ctx.host.path(&s.context)?;
    let tag = ctx.host.expand(&s.tag)?;
    let mut args: Vec<String> = vec!["build".into(), "--tag".into(), tag.clone()];
    if let Some(f) = &s.file {
        args.push("--file".into());
        args.push(format!(
            "{}/{}",
            context.trim_end_matches('/'),
            ctx.host.expand(f)?
        ));
    }
    for (k, v) in &s.build_args {
        args.push("--build-arg".into());
        args.push(format!("{k}={}", ctx.host.expand(v)?));
    }
    args.push("--".into());
    args.push(context.clone());
    if ctx.plan {
        return Ok(report(
            "docker_build",
            true,
            format!("would build {tag} from {context}"),
            vec![],
        ));
    }
    let before = engine.image_id(&tag).await?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = engine.raw(&argv, &[], Some(s.timeout)).await?;
    if !out.success() {
        bail!(
            "{}: docker build of {tag} from {context} failed: {}",
            ctx.host.name(),
            out.tail()
        );
    }
    let id = engine.image_id(&tag).await?.unwrap_or_default();
    let changed = before.as_deref() != Some(id.as_str());
    let log: Vec<String> = out
        .stdout_str()
        .lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::to_string)
        .collect();
    Ok(report(
        "docker_build",
        changed,
        format!("built {tag} ({})", short_id(&id)),
        log,
    ))
}

async fn tag(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerTagStep,
) -> anyhow::Result<StepReport> {
    let src = ctx.host.expand(&s.source)?;
    let dst = ctx.host.expand(&s.target)?;
    let host = ctx.host.name();
    let src_id = engine.image_id(&src).await?;
    let dst_id = engine.image_id(&dst).await?;
    if src_id.is_some() && src_id == dst_id {
        return Ok(report(
            "docker_tag",
            false,
            format!("{dst} already is {src}"),
            vec![],
        ));
    }
    if ctx.plan {
        return Ok(report(
            "docker_tag",
            true,
            format!("would tag {src} as {dst}"),
            vec![],
        ));
    }
    if src_id.is_none() {
        bail!(
            "{host}: cannot tag {src}: the engine has no such image (did the build or pull step run?)"
        );
    }
    engine.run(&["tag", &src, &dst], None).await?;
    Ok(report(
        "docker_tag",
        true,
        format!("tagged {src} as {dst}"),
        vec![],
    ))
}

async fn push(ctx: &StepCtx<'_>, engine: &Engine<'_>, s: &ImageStep) -> anyhow::Result<StepReport> {
    let image = ctx.host.expand(&s.image)?;
    if ctx.plan {
        return Ok(report(
            "docker_push",
            true,
            format!("would push {image}"),
            vec![],
        ));
    }
    let out = engine
        .raw(&["push", "--", &image], &[], Some(TRANSFER_TIMEOUT))
        .await?;
    if !out.success() {
        bail!(
            "{}: docker push {image} failed: {}\n(did a docker_login step for its registry run first?)",
            ctx.host.name(),
            out.tail()
        );
    }
    let text = out.stdout_str();
    let digest = text
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or("?");
    Ok(report(
        "docker_push",
        true,
        format!("pushed {image} ({digest})"),
        vec![],
    ))
}

async fn pull_step(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &ImageStep,
) -> anyhow::Result<StepReport> {
    let image = ctx.host.expand(&s.image)?;
    let before = engine.image_id(&image).await?;
    if ctx.plan {
        return Ok(report(
            "docker_pull",
            true,
            format!("would pull {image}"),
            vec![],
        ));
    }
    let out = engine
        .raw(&["pull", "--", &image], &[], Some(TRANSFER_TIMEOUT))
        .await?;
    if !out.success() {
        bail!(
            "{}: docker pull {image} failed: {}",
            ctx.host.name(),
            out.tail()
        );
    }
    let after = engine.image_id(&image).await?.unwrap_or_default();
    let changed = before.as_deref() != Some(after.as_str());
    let summary = if changed {
        format!("pulled {image} ({})", short_id(&after))
    } else {
        format!("{image} already current ({})", short_id(&after))
    };
    Ok(report("docker_pull", changed, summary, vec![]))
}

async fn prune_step(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerPruneStep,
) -> anyhow::Result<StepReport> {
    let repo = ctx.host.expand(&s.repository)?;
    let rows = prune::parse_rows(
        &engine
            .run(
                &[
                    "images",
                    "--no-trunc",
                    "--format",
                    "{{.ID}}\t{{.Repository}}\t{{.Tag}}",
                ],
                None,
            )
            .await?,
    );
    // Image ids every container (running or stopped, rollback ones included) was created from.
    let ids = engine
        .run(&["ps", "--all", "--quiet", "--no-trunc"], None)
        .await?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    let mut in_use = BTreeSet::new();
    if !ids.is_empty() {
        let mut args = vec!["container", "inspect", "--format", "{{.Image}}", "--"];
        args.extend(&ids);
        // A container removed meanwhile makes inspect fail for it; the rest still print.
        let out = engine.raw(&args, &[], None).await?;
        in_use.extend(out.stdout_str().split_whitespace().map(str::to_string));
    }
    let ours: BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.repository == repo)
        .map(|r| r.id.as_str())
        .collect();
    let mut created = BTreeMap::new();
    if !ours.is_empty() {
        let mut args = vec![
            "image",
            "inspect",
            "--format",
            "{{.Id}}\t{{.Created}}",
            "--",
        ];
        args.extend(ours.iter().copied());
        for line in engine.run(&args, None).await?.lines() {
            if let Some((id, t)) = line.split_once('\t') {
                created.insert(id.to_string(), t.to_string());
            }
        }
    }
    let plan = prune::plan(&rows, &repo, s.keep, &created, &in_use);
    let mut log: Vec<String> = plan
        .kept_in_use
        .iter()
        .map(|id| format!("kept {} (a container uses it)", short_id(id)))
        .collect();
    if ctx.plan || plan.remove.is_empty() {
        let verb = if ctx.plan { "would remove" } else { "removed" };
        return Ok(report(
            "docker_prune",
            !plan.remove.is_empty(),
            format!(
                "{verb} {} tag(s) of {repo}; keeping {} newest and {} in use",
                plan.remove.len(),
                plan.kept_newest.len(),
                plan.kept_in_use.len()
            ),
            plan.remove
                .iter()
                .map(|t| format!("{verb} {t}"))
                .chain(log)
                .collect(),
        ));
    }
    let mut args = vec!["rmi", "--"];
    args.extend(plan.remove.iter().map(String::as_str));
    engine.run(&args, None).await?;
    log.extend(plan.remove.iter().map(|t| format!("removed {t}")));
    Ok(report(
        "docker_prune",
        true,
        format!(
            "removed {} tag(s) of {repo}; kept {} newest and {} in use",
            plan.remove.len(),
            plan.kept_newest.len(),
            plan.kept_in_use.len()
        ),
        log,
    ))
}

async fn remove_step(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerRemoveStep,
) -> anyhow::Result<StepReport> {
    let name = ctx.host.expand(&s.name)?;
    let names = [name.clone(), prev_name(&name), aside_name(&name)];
    let mut present = Vec::new();
    for n in &names {
        if engine.container(n).await?.is_some() {
            present.push(n.clone());
        }
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
