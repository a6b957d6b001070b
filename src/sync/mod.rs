//! Sync: ship a local build directory to hosts by content-hash diff, into atomic releases.
//! (Being built: see issue 3.)

use crate::deploy::{StepCtx, StepReport};
use crate::playbook::{SyncRemoveStep, SyncStep};

pub async fn run(_ctx: &StepCtx<'_>, _step: &SyncStep) -> anyhow::Result<StepReport> {
    anyhow::bail!("sync is not built yet")
}

pub async fn rollback(
    _ctx: &StepCtx<'_>,
    _step: &SyncStep,
    _to: Option<&str>,
) -> anyhow::Result<StepReport> {
    anyhow::bail!("sync rollback is not built yet")
}

pub async fn remove(_ctx: &StepCtx<'_>, _step: &SyncRemoveStep) -> anyhow::Result<StepReport> {
    anyhow::bail!("sync_remove is not built yet")
}
