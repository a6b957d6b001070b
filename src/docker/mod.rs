//! Docker on the hosts, through the `docker` CLI over SSH: the container steps of a playbook
//! (login, service container, accessories, build, tag, push, pull, prune, remove) and rollback.
//!
//! Every container ferry starts carries labels: `ferry.app`, `ferry.env`, `ferry.ref`, `ferry.sha`,
//! `ferry.release` and `ferry.spec` (hash of the resolved spec), so that status and idempotence
//! checks read facts from the host rather than guess.
//!
//! A service container update: pull, move the old container aside (`NAME.ferry-aside`, stopped so it
//! releases its ports), create and start the new one, wait for health. On success the old one is
//! kept stopped as `NAME.ferry-prev` for `ferry rollback` (the one kept before waits as
//! `NAME.ferry-older` until the run succeeds, see `commit`, then goes); on failure
//! the new one's logs are shown, it is removed and the old one is renamed back and started.
//! Downtime is the time from stopping the old container to the new one being healthy.

mod container;
pub mod engine;
pub mod health;
mod image;
pub mod prune;
pub mod spec;

use anyhow::{Context, bail};

use crate::deploy::{StepCtx, StepReport};
use crate::inventory::Host;
use crate::playbook::{ContainerSpec, Step};
use engine::Engine;
use spec::Resolved;

pub use container::{commit, live, revert, rollback};

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
    /// The container a replace set aside is still there: that replace was cut off (the next
    /// deploy restores it or removes it).
    pub aside: bool,
}

/// Run one docker step on the host of `ctx` (with `ctx.plan`, only say what would happen).
pub async fn run(ctx: &StepCtx<'_>, step: &Step) -> anyhow::Result<StepReport> {
    let engine = Engine::new(ctx.host, ctx.session);
    match step {
        Step::DockerLogin(s) => image::login(ctx, &engine, s).await,
        Step::Container(c) => container::run(ctx, &engine, c, container::Role::Service).await,
        Step::Accessory(c) => container::run(ctx, &engine, c, container::Role::Accessory).await,
        Step::DockerBuild(s) => image::build(ctx, &engine, s).await,
        Step::DockerTag(s) => image::tag(ctx, &engine, s).await,
        Step::DockerPush(s) => image::push(ctx, &engine, s).await,
        Step::DockerPull(s) => image::pull(ctx, &engine, s).await,
        Step::DockerPrune(s) => image::prune(ctx, &engine, s).await,
        Step::DockerRemove(s) => container::remove(ctx, &engine, s).await,
        other => bail!("{} is not a docker step", other.kind()),
    }
}

pub(crate) fn report(step: &str, changed: bool, summary: String, log: Vec<String>) -> StepReport {
    StepReport {
        step: step.into(),
        changed,
        summary,
        log,
        ..Default::default()
    }
}

/// The spec for this host, with secrets read from the controller's environment.
pub(crate) fn resolve(host: &Host, spec: &ContainerSpec) -> anyhow::Result<Resolved> {
    spec::resolve(
        spec,
        host.name(),
        &|s| host.template(s),
        &crate::ci::secret_var,
    )
    .with_context(|| host.name().to_string())
}

/// An image id as `docker images` shows it: 12 hex digits.
pub(crate) fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    id.get(..12).unwrap_or(id)
}
