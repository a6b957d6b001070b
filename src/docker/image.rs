//! Image steps on one host: registry login (password on stdin), build from a synced context, tag,
//! push, pull, and prune (the decision is in `prune`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::bail;

use super::engine::{Engine, TRANSFER_TIMEOUT};
use super::{prune as plan, report, short_id};
use crate::deploy::{StepCtx, StepReport};
use crate::playbook::{
    DockerBuildStep, DockerLoginStep, DockerPruneStep, DockerPushStep, DockerTagStep, ImageStep,
};

pub(crate) async fn login(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerLoginStep,
) -> anyhow::Result<StepReport> {
    let host = ctx.host.name();
    let registry = ctx.host.expand(&s.registry)?;
    let user = ctx.host.expand(&s.user)?;
    let password = match crate::ci::password_var(&s.password_env) {
        Ok(p) => p,
        Err(why) => bail!(
            "{host}: docker_login to {registry}: environment variable {}, {why}: it must hold the \
             password of `{user}` (a masked CI/CD variable)",
            s.password_env
        ),
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
        let hint = registry_hint(&tail).unwrap_or_else(|| {
            format!(
                "check the password in {} and that `{user}` may log in to {registry}",
                s.password_env
            )
        });
        bail!("{host}: docker login to {registry} as `{user}` failed: {tail}\n({hint})");
    }
    Ok(report(
        "docker_login",
        false,
        format!("logged in to {registry} as {user}"),
        vec![],
    ))
}

pub(crate) async fn build(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerBuildStep,
) -> anyhow::Result<StepReport> {
    let context = ctx.host.path(&s.context)?;
    let tag = ctx.host.expand(&s.tag)?;
    // (`--force-rm`: the classic builder keeps a failed step's container without it.)
    let mut args: Vec<String> = vec![
        "build".into(),
        "--force-rm".into(),
        "--tag".into(),
        tag.clone(),
    ];
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
        // The classic builder prints the build's own output (a compiler's error) on stdout and
        // only its verdict on stderr: both are shown.
        let last = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let lines: Vec<&str> = text.trim_end().lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n  ")
        };
        let output = match last(&out.stdout) {
            s if s.trim().is_empty() => String::new(),
            s => format!("\nbuild output (last lines):\n  {s}"),
        };
        bail!(
            "{}: docker build of {tag} from {context} failed: {}{output}",
            ctx.host.name(),
            last(&out.stderr)
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

pub(crate) async fn tag(
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

pub(crate) async fn push(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerPushStep,
) -> anyhow::Result<StepReport> {
    let host = ctx.host.name();
    let image = ctx.host.expand(&s.image)?;
    if ctx.plan {
        return Ok(report(
            "docker_push",
            true,
            format!("would push {image}"),
            vec![],
        ));
    }
    let Some(ours) = engine.image_id(&image).await? else {
        bail!(
            "{host}: there is no image {image} on the host to push (did docker_build or docker_tag run?)"
        );
    };
    // What the registry has under this tag, asked through the daemon (its logins and registry
    // settings): a pull. The tag then names the registry's image, as it stays when the push is
    // refused (this host agrees with the registry; the build keeps its other tags).
    let out = engine
        .raw(&["pull", "-q", "--", &image], &[], Some(TRANSFER_TIMEOUT))
        .await?;
    let theirs = if out.success() {
        engine.image_id(&image).await?
    } else {
        // Pushed only when the registry says it has no such tag (or `overwrite` lets it replace
        // whatever is there): a pull that fails for another reason proves nothing.
        match (pull_failure(&out.tail()), s.overwrite) {
            (PullFailure::Absent, _) | (_, true) => None,
            (PullFailure::OtherPlatforms, false) => bail!(
                "{host}: the registry already has {image}, for other platforms than this host's \
                 (docker pull: {}); a published tag is not replaced. Publish a new tag, or set \
                 `overwrite: true` on the docker_push step",
                out.tail()
            ),
            (PullFailure::Unknown, false) => bail!(
                "{host}: cannot tell whether the registry has {image} already, so it is not \
                 pushed: docker pull {image} failed: {}\n({})",
                out.tail(),
                registry_hint(&out.tail()).unwrap_or(LOGIN_HINT.into())
            ),
        }
    };
    match theirs {
        Some(t) if t == ours => {
            return Ok(report(
                "docker_push",
                false,
                format!("{image} is in the registry already ({})", short_id(&ours)),
                vec![],
            ));
        }
        Some(t) if !s.overwrite => bail!(
            "{host}: the registry already has {image}, as another image ({} there, {} here); a \
             published tag is not replaced, and {image} on this host names the registry's image \
             again. Publish a new tag, or set `overwrite: true` on the docker_push step",
            short_id(&t),
            short_id(&ours)
        ),
        Some(_) => {
            engine.run(&["tag", &ours, &image], None).await?;
        }
        None => {}
    }
    let out = engine
        .raw(&["push", "--", &image], &[], Some(TRANSFER_TIMEOUT))
        .await?;
    if !out.success() {
        bail!(
            "{}: docker push {image} failed: {}\n({})",
            ctx.host.name(),
            out.tail(),
            registry_hint(&out.tail()).unwrap_or(LOGIN_HINT.into())
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

/// What a failed `docker pull` of a tag tells of the registry's tag.
#[derive(Debug, PartialEq, Eq)]
enum PullFailure {
    /// No such tag or repository: a first push.
    Absent,
    /// The tag is there, as a manifest list without this host's platform.
    OtherPlatforms,
    /// Anything else (a login, TLS, the network): whether the tag is there is unknown.
    Unknown,
}

/// The hint for a registry that refused us (credentials), not one we could not reach.
const LOGIN_HINT: &str = "did a docker_login step for its registry run first?";

/// The hint for a registry the daemon could not reach or talk to (as Go's net/http and Docker
/// word it), if that is what `error` says: then credentials are beside the point.
pub(crate) fn registry_hint(error: &str) -> Option<String> {
    let e = error.to_ascii_lowercase();
    let unreachable = [
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "no route to host",
        "connection reset",
        "context deadline exceeded",
        "tls handshake timeout",
    ];
    if unreachable.iter().any(|s| e.contains(s)) {
        return Some(
            "the Docker engine on this host cannot reach the registry: check its address and \
             port, that it is up, and that this host's network (DNS, proxy, firewall) lets \
             docker reach it"
                .into(),
        );
    }
    if e.contains("server gave http response to https client") {
        return Some(
            "the registry speaks plain HTTP: serve it over TLS, or list it under \
             `insecure-registries` in this host's /etc/docker/daemon.json"
                .into(),
        );
    }
    if e.contains("x509:") || e.contains("certificate") {
        return Some(
            "the registry's TLS certificate is not trusted by this host's Docker engine: put its \
             CA in /etc/docker/certs.d/<registry>/ca.crt"
                .into(),
        );
    }
    None
}

/// Reads the daemon's error (as Docker and registries word it: `manifest unknown`, `name unknown`,
/// Docker Hub's `repository does not exist`).
fn pull_failure(error: &str) -> PullFailure {
    let e = error.to_ascii_lowercase();
    if e.contains("no matching manifest") {
        PullFailure::OtherPlatforms
    } else if [
        "manifest unknown",
        "not found",
        "name unknown",
        "does not exist",
    ]
    .iter()
    .any(|s| e.contains(s))
    {
        PullFailure::Absent
    } else {
        PullFailure::Unknown
    }
}

pub(crate) async fn pull(
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
            "{}: docker pull {image} failed: {}{}",
            ctx.host.name(),
            out.tail(),
            registry_hint(&out.tail())
                .map(|h| format!("\n({h})"))
                .unwrap_or_default()
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

pub(crate) async fn prune(
    ctx: &StepCtx<'_>,
    engine: &Engine<'_>,
    s: &DockerPruneStep,
) -> anyhow::Result<StepReport> {
    let repo = ctx.host.expand(&s.repository)?;
    let rows = plan::parse_rows(
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
    let plan = plan::plan(&rows, &repo, s.keep, &created, &in_use);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_pull_is_a_missing_tag_only_when_the_registry_says_so() {
        for absent in [
            "Error response from daemon: manifest for 127.0.0.1:5000/shop:v1 not found: manifest unknown: manifest unknown",
            "Error response from daemon: pull access denied for shop, repository does not exist or may require 'docker login': denied: requested access to the resource is denied",
            "Error response from daemon: name unknown: repository name not known to registry",
        ] {
            assert_eq!(pull_failure(absent), PullFailure::Absent, "{absent}");
        }
        assert_eq!(
            pull_failure("no matching manifest for linux/amd64 in the manifest list entries"),
            PullFailure::OtherPlatforms
        );
        for unknown in [
            "Error response from daemon: Get \"https://reg/v2/\": no basic auth credentials",
            "Error response from daemon: Get \"https://reg/v2/\": x509: certificate signed by unknown authority",
            "Error response from daemon: Get \"http://127.0.0.1:5000/v2/\": dial tcp 127.0.0.1:5000: connect: connection refused",
            "unauthorized: authentication required",
        ] {
            assert_eq!(pull_failure(unknown), PullFailure::Unknown, "{unknown}");
        }
    }

    #[test]
    fn an_unreachable_registry_is_not_blamed_on_credentials() {
        let refused = "Error response from daemon: Get \"http://127.0.0.1:5999/v2/\": dial tcp \
                       127.0.0.1:5999: connect: connection refused";
        assert!(
            registry_hint(refused)
                .unwrap()
                .contains("cannot reach the registry")
        );
        let tls = "Get \"https://reg/v2/\": x509: certificate signed by unknown authority";
        assert!(registry_hint(tls).unwrap().contains("certs.d"));
        let http = "Get \"https://reg:5000/v2/\": http: server gave HTTP response to HTTPS client";
        assert!(registry_hint(http).unwrap().contains("insecure-registries"));
        for creds in [
            "unauthorized: authentication required",
            "Error response from daemon: Get \"https://reg/v2/\": no basic auth credentials",
        ] {
            assert_eq!(registry_hint(creds), None, "{creds}");
        }
    }
}
