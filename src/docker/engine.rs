//! The thin adapter to a host's Docker engine: the host's `docker` argv (possibly `sudo docker`) run
//! over SSH, each argument quoted, with typed errors and the few facts ferry reads back (container
//! state, image ids). Decisions live in `spec`, `prune` and the steps, not here.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::inventory::Host;
use crate::ssh::{Output, Session, SshError};

const QUICK: Duration = Duration::from_secs(120);
/// Pulls and pushes move whole images: give them room.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "{host}: docker command `{command}` not found on the host: install Docker there, or set \
         `docker: {{ command: [...] }}` for this host in the playbook"
    )]
    Missing { host: String, command: String },
    #[error("{host}: `{command}` failed (exit {status}): {tail}")]
    Failed {
        host: String,
        command: String,
        status: String,
        tail: String,
    },
    #[error(transparent)]
    Ssh(#[from] SshError),
}

/// A container as `docker container inspect` shows it.
#[derive(Debug, Clone, Default)]
pub struct ContainerState {
    pub id: String,
    pub running: bool,
    /// Docker is restarting it after it exited (restart policy).
    pub restarting: bool,
    pub exit_code: i64,
    pub health: Option<String>,
    /// The image id (`sha256:...`) the container was created from.
    pub image_id: String,
    /// The image name as given at creation.
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// The restart policy (`no`, `always`, `unless-stopped`, `on-failure[:N]`).
    pub restart: String,
    /// How often Docker restarted it (its restart policy, after it exited).
    pub restart_count: i64,
    /// When it was created and when it last started (the host's clock, RFC 3339).
    pub created: String,
    pub started_at: String,
}

/// The host's Docker engine, reached through its session.
pub struct Engine<'a> {
    pub host: &'a Host,
    pub session: &'a Session,
}

impl<'a> Engine<'a> {
    pub fn new(host: &'a Host, session: &'a Session) -> Engine<'a> {
        Engine { host, session }
    }

    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut v = self.host.docker.clone();
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }

    /// How a command is shown in messages: the docker argv and the subcommand.
    fn display(&self, args: &[&str]) -> String {
        crate::shell::join_str(&self.argv(&args[..args.len().min(4)]))
    }

    /// Run `docker ARGS` with `stdin`; the raw output, or `Missing` when docker is not there.
    pub async fn raw(
        &self,
        args: &[&str],
        stdin: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Output, DockerError> {
        let cmd = crate::shell::join(self.argv(args)).map_err(|_| SshError::Nul {
            host: self.host.name().into(),
        })?;
        tracing::debug!(command = %self.display(args), "docker");
        let out = self
            .session
            .run_raw(&cmd, stdin, timeout.or(Some(QUICK)), None)
            .await?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status == Some(127)
            || out.status == Some(126)
            || (err.contains("command not found") && err.contains(&self.host.docker[0]))
        {
            return Err(DockerError::Missing {
                host: self.host.name().into(),
                command: crate::shell::join_str(&self.host.docker),
            });
        }
        Ok(out)
    }

    /// Run `docker ARGS`; its stdout, or a `Failed` error with the tail of its output.
    pub async fn run(
        &self,
        args: &[&str],
        timeout: Option<Duration>,
    ) -> Result<String, DockerError> {
        let out = self.raw(args, &[], timeout).await?;
        self.check(args, out)
    }

    pub fn check(&self, args: &[&str], out: Output) -> Result<String, DockerError> {
        if out.success() {
            Ok(out.stdout_str())
        } else {
            Err(self.failed(args, &out))
        }
    }

    pub fn failed(&self, args: &[&str], out: &Output) -> DockerError {
        DockerError::Failed {
            host: self.host.name().into(),
            command: self.display(args),
            status: out
                .status
                .map_or_else(|| "by signal".into(), |s| s.to_string()),
            tail: out.tail(),
        }
    }

    /// The container called `name`, or `None` when there is none.
    pub async fn container(&self, name: &str) -> Result<Option<ContainerState>, DockerError> {
        let args = ["container", "inspect", "--", name];
        let out = self.raw(&args, &[], None).await?;
        if !out.success() {
            let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
            if err.contains("no such") {
                return Ok(None);
            }
            return Err(self.failed(&args, &out));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| DockerError::Failed {
                host: self.host.name().into(),
                command: self.display(&args),
                status: "0".into(),
                tail: format!("unreadable JSON: {e}"),
            })?;
        Ok(Some(parse_container(&v[0])))
    }

    /// The id of a local image, or `None` when the engine does not have it.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, DockerError> {
        let args = ["image", "inspect", "--format", "{{.Id}}", "--", image];
        let out = self.raw(&args, &[], None).await?;
        if out.success() {
            Ok(Some(out.stdout_str().trim().to_string()))
        } else if String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("no such")
        {
            Ok(None)
        } else {
            Err(self.failed(&args, &out))
        }
    }

    /// The registry digests of a local image (`repo@sha256:...`: the repositories it was pulled
    /// from or pushed to).
    pub async fn repo_digests(&self, image: &str) -> Result<Vec<String>, DockerError> {
        let args = [
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "--",
            image,
        ];
        let out = self.run(&args, None).await?;
        Ok(serde_json::from_str(out.trim()).unwrap_or_default())
    }

    /// `docker container rm -f NAME` if it exists; true when something was removed.
    pub async fn remove(&self, name: &str) -> Result<bool, DockerError> {
        if self.container(name).await?.is_none() {
            return Ok(false);
        }
        self.run(&["container", "rm", "--force", "--", name], None)
            .await?;
        Ok(true)
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<(), DockerError> {
        self.run(&["container", "rename", from, to], None).await?;
        Ok(())
    }

    pub async fn stop(&self, name: &str) -> Result<(), DockerError> {
        self.run(&["container", "stop", "--", name], None).await?;
        Ok(())
    }

    /// `docker container update --restart POLICY NAME`.
    pub async fn set_restart(&self, name: &str, policy: &str) -> Result<(), DockerError> {
        self.run(
            &["container", "update", "--restart", policy, "--", name],
            None,
        )
        .await?;
        Ok(())
    }

    pub async fn start(&self, name: &str) -> Result<(), DockerError> {
        self.run(&["container", "start", "--", name], None).await?;
        Ok(())
    }

    /// The exit code of the run before `state`'s current one (from the engine's events), for a
    /// container its restart policy has already started again. `None` when the events do not say
    /// (Docker keeps only its last 256 in memory).
    pub async fn last_exit_code(&self, state: &ContainerState) -> Option<i64> {
        let filter = format!("container={}", state.id);
        let args = [
            "events",
            "--since",
            &state.created,
            "--until",
            &state.started_at,
            "--filter",
            &filter,
            "--format",
            "{{json .}}",
        ];
        let out = self.run(&args, Some(EVENTS_TIMEOUT)).await.ok()?;
        out.lines().rev().find_map(died_with)
    }

    /// The last lines of a container's logs (stdout and stderr), for failure reports.
    pub async fn logs(&self, name: &str) -> Vec<String> {
        match self
            .raw(
                &["container", "logs", "--tail", "40", "--", name],
                &[],
                None,
            )
            .await
        {
            Ok(out) => {
                let mut text = out.stdout_str();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                text.lines().map(str::to_string).collect()
            }
            Err(e) => vec![format!("(cannot read logs: {e})")],
        }
    }
}

/// How long `docker events` (bounded by `--until`) may take.
const EVENTS_TIMEOUT: Duration = Duration::from_secs(10);

/// The exit code in one event line (`--format '{{json .}}'`) if it is a container's death: Docker
/// says `"Action":"die"` with `Actor.Attributes.exitCode` (a string), Podman `"Status":"died"`
/// with `ContainerExitCode`.
fn died_with(line: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let action = v
        .get("Action")
        .or_else(|| v.get("Status"))
        .and_then(|a| a.as_str())?;
    if !matches!(action, "die" | "died") {
        return None;
    }
    let code = v
        .pointer("/Actor/Attributes/exitCode")
        .or_else(|| v.get("ContainerExitCode"))?;
    code.as_i64()
        .or_else(|| code.as_str().and_then(|c| c.parse().ok()))
}

/// The facts ferry reads from one `docker container inspect` object.
pub fn parse_container(v: &serde_json::Value) -> ContainerState {
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or_default();
    ContainerState {
        id: s("/Id").into(),
        running: v
            .pointer("/State/Running")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        restarting: v
            .pointer("/State/Restarting")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        exit_code: v
            .pointer("/State/ExitCode")
            .and_then(|x| x.as_i64())
            .unwrap_or(0),
        health: v
            .pointer("/State/Health/Status")
            .and_then(|x| x.as_str())
            .map(str::to_string),
        image_id: s("/Image").into(),
        image: s("/Config/Image").into(),
        labels: v
            .pointer("/Config/Labels")
            .and_then(|x| x.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        restart_count: v
            .pointer("/RestartCount")
            .and_then(|x| x.as_i64())
            .unwrap_or(0),
        created: s("/Created").into(),
        started_at: s("/State/StartedAt").into(),
        restart: match (
            s("/HostConfig/RestartPolicy/Name"),
            v.pointer("/HostConfig/RestartPolicy/MaximumRetryCount")
                .and_then(|x| x.as_i64())
                .unwrap_or(0),
        ) {
            ("on-failure", n) if n > 0 => format!("on-failure:{n}"),
            (name, _) => name.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exit_code_of_a_death_from_either_engine() {
        let docker = r#"{"status":"die","id":"c1","Type":"container","Action":"die","Actor":{"ID":"c1","Attributes":{"exitCode":"3","name":"web"}},"time":1}"#;
        let podman = r#"{"ID":"c1","Image":"i","Name":"web","Status":"died","Time":"t","Type":"container","ContainerExitCode":4}"#;
        assert_eq!(died_with(docker), Some(3));
        assert_eq!(died_with(podman), Some(4));
        assert_eq!(died_with(&docker.replace("\"die\"", "\"start\"")), None);
        assert_eq!(died_with("not json"), None);
    }

    #[test]
    fn reads_inspect_json() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"Id":"c1","Image":"sha256:ab","State":{"Running":true,"Status":"running","ExitCode":0,
               "Health":{"Status":"healthy"}},"Config":{"Image":"reg/shop:v1","Labels":{"ferry.spec":"h"}}}"#,
        )
        .unwrap();
        let c = parse_container(&v);
        assert!(c.running);
        assert_eq!(c.health.as_deref(), Some("healthy"));
        assert_eq!(c.image_id, "sha256:ab");
        assert_eq!(c.labels["ferry.spec"], "h");
        let c = parse_container(&serde_json::json!({"Id": "x", "Config": {"Labels": null}}));
        assert!(!c.running && c.labels.is_empty() && c.health.is_none());
    }
}
