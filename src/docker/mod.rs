//! Docker on the hosts, through the `docker` CLI over SSH. (Being built: see issue 4.)

use crate::deploy::{StepCtx, StepReport};
use crate::playbook::{ContainerSpec, Step};

pub async fn run(_ctx: &StepCtx<'_>, step: &Step) -> anyhow::Result<StepReport> {
    anyhow::bail!("{} is not built yet", step.kind())
}

pub async fn rollback(_ctx: &StepCtx<'_>, _spec: &ContainerSpec) -> anyhow::Result<StepReport> {
    anyhow::bail!("container rollback is not built yet")
}
