//! Reporting deploys to GitLab: a commit status `ferry/<env>` (running, then success or failed, linking
//! the environment URL) and, with `gitlab.deployments: true`, a deployment through the Deployments
//! API, unless the job has an `environment:` of its own (GitLab records that one). It reports only
//! when the token variable (`gitlab.token_env`, default `FERRY_GITLAB_TOKEN`) is set. The token
//! goes in the `PRIVATE-TOKEN` header and is never printed. GitLab being down or refusing a request
//! is a warning: it never fails a deploy. The blocking HTTP calls run on tokio's blocking pool.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use crate::ci::DeployContext;
use crate::playbook::Playbook;

pub const DEFAULT_TOKEN_ENV: &str = "FERRY_GITLAB_TOKEN";
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Success,
    Failed,
}

impl State {
    /// The word both APIs use.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Success => "success",
            State::Failed => "failed",
        }
    }
}

/// Reports one environment's deploy of one commit.
pub struct Reporter {
    /// `https://gitlab.example.com/api/v4/projects/<id>`.
    project_url: String,
    token: String,
    env: String,
    /// The deployment's environment: `review/<ref slug>` for one deployed per branch, as GitLab
    /// names review apps.
    deploy_env: String,
    ctx: DeployContext,
    target_url: Option<String>,
    deployments: bool,
    deployment_id: Mutex<Option<u64>>,
}

/// Percent-encode a project path (`group/app` → `group%2Fapp`) as the API wants it.
pub fn encode_project(p: &str) -> String {
    p.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The commit status request body: `POST /projects/:id/statuses/:sha`.
pub fn status_body(
    ctx: &DeployContext,
    env: &str,
    state: State,
    target_url: Option<&str>,
    took: Option<Duration>,
) -> Value {
    let description = match (state, took) {
        (State::Running, _) => format!("ferry is deploying to {env}"),
        (s, Some(t)) => format!(
            "ferry deploy to {env}: {} in {:.0}s",
            s.as_str(),
            t.as_secs_f64()
        ),
        (s, None) => format!("ferry deploy to {env}: {}", s.as_str()),
    };
    let mut body = json!({
        "state": state.as_str(),
        "ref": ctx.ref_name,
        "name": format!("ferry/{env}"),
        "description": description,
    });
    if let Some(u) = target_url {
        body["target_url"] = u.into();
    }
    if let Some(p) = ctx
        .pipeline_id
        .as_deref()
        .and_then(|p| p.parse::<u64>().ok())
    {
        body["pipeline_id"] = p.into();
    }
    body
}

impl Reporter {
    /// A reporter when a token is set; `None` (with a warning if the setup is incomplete) otherwise.
    /// `target_url`: the environment's `url:`, expanded (the link GitLab shows).
    pub fn new(
        pb: &Playbook,
        ctx: &DeployContext,
        env: &str,
        target_url: Option<String>,
    ) -> Option<Reporter> {
        let settings = pb.gitlab.as_ref();
        let token_env = settings
            .and_then(|s| s.token_env.clone())
            .unwrap_or_else(|| DEFAULT_TOKEN_ENV.into());
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let token = var(&token_env)?.trim().to_string();
        let Some(api) = settings
            .and_then(|s| s.url.clone())
            .or_else(|| var("CI_API_V4_URL"))
        else {
            tracing::warn!(
                "{token_env} is set but the GitLab API URL is not: set gitlab.url in the playbook or CI_API_V4_URL; not reporting to GitLab"
            );
            return None;
        };
        let Some(project) = settings
            .and_then(|s| s.project.clone())
            .or_else(|| var("CI_PROJECT_ID"))
        else {
            tracing::warn!(
                "{token_env} is set but the project is not: set gitlab.project in the playbook or CI_PROJECT_ID; not reporting to GitLab"
            );
            return None;
        };
        Some(Reporter {
            project_url: format!(
                "{}/projects/{}",
                api.trim_end_matches('/'),
                encode_project(&project)
            ),
            token,
            env: env.into(),
            deploy_env: match crate::status::is_per_branch(pb, env) {
                true => format!("{env}/{}", ctx.ref_slug),
                false => env.into(),
            },
            ctx: ctx.clone(),
            target_url,
            deployments: settings.is_some_and(|s| s.deployments) && !job_has_environment(),
            deployment_id: Mutex::new(None),
        })
    }

    /// Report `state`; failures are warnings.
    pub async fn report(&self, state: State, took: Option<Duration>) {
        let body = status_body(
            &self.ctx,
            &self.env,
            state,
            self.target_url.as_deref(),
            took,
        );
        let url = format!("{}/statuses/{}", self.project_url, self.ctx.sha);
        if let Err(e) = self.call("POST", url, body).await {
            warn(&format!(
                "cannot set the commit status ferry/{}: {e}",
                self.env
            ));
        }
        if !self.deployments {
            return;
        }
        let existing = *self.deployment_id.lock().unwrap();
        if let (None, Some(url)) = (existing, &self.target_url)
            && let Err(e) = self.environment_url(url).await
        {
            warn(&format!(
                "cannot set the URL of GitLab environment {}: {e}",
                self.deploy_env
            ));
        }
        let r = match existing {
            None => {
                let body = json!({
                    "environment": self.deploy_env,
                    "sha": self.ctx.sha,
                    "ref": self.ctx.ref_name,
                    "tag": self.ctx.is_tag,
                    "status": state.as_str(),
                });
                let url = format!("{}/deployments", self.project_url);
                self.call("POST", url, body).await.and_then(|v| {
                    let id = v["id"]
                        .as_u64()
                        .ok_or_else(|| "the response has no deployment id".to_string())?;
                    *self.deployment_id.lock().unwrap() = Some(id);
                    Ok(())
                })
            }
            Some(id) => {
                let url = format!("{}/deployments/{id}", self.project_url);
                self.call("PUT", url, json!({"status": state.as_str()}))
                    .await
                    .map(|_| ())
            }
        };
        if let Err(e) = r {
            warn(&format!(
                "cannot update the GitLab deployment of {}: {e}",
                self.env
            ));
        }
    }

    /// Give the deployment's environment the playbook's `url` (its link in GitLab): the
    /// Deployments API takes none, so the Environments API makes or edits the environment first.
    async fn environment_url(&self, url: &str) -> Result<(), String> {
        let list = format!(
            "{}/environments?name={}",
            self.project_url,
            encode_project(&self.deploy_env)
        );
        let found = self.call("GET", list, Value::Null).await?;
        let known = found
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == self.deploy_env.as_str()));
        match known {
            Some(e) if e["external_url"] == url => Ok(()),
            Some(e) => {
                let id = e["id"]
                    .as_u64()
                    .ok_or_else(|| "the environment has no id".to_string())?;
                let put = format!("{}/environments/{id}", self.project_url);
                self.call("PUT", put, json!({ "external_url": url }))
                    .await
                    .map(|_| ())
            }
            None => {
                let post = format!("{}/environments", self.project_url);
                let body = json!({ "name": self.deploy_env, "external_url": url });
                self.call("POST", post, body).await.map(|_| ())
            }
        }
    }

    /// One JSON request off the async threads; the parsed response body or a message.
    async fn call(&self, method: &'static str, url: String, body: Value) -> Result<Value, String> {
        let token = self.token.clone();
        let job = tokio::task::spawn_blocking(move || -> Result<Value, String> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(TIMEOUT))
                .http_status_as_error(false)
                .build()
                .into();
            let sent = match method {
                "GET" => agent.get(&url).header("PRIVATE-TOKEN", &token).call(),
                _ => {
                    let req = match method {
                        "PUT" => agent.put(&url),
                        _ => agent.post(&url),
                    };
                    req.header("PRIVATE-TOKEN", &token)
                        .header("Content-Type", "application/json")
                        .send(body.to_string().as_bytes())
                }
            };
            let mut resp = sent.map_err(|e| format!("{method} {url}: {e}"))?;
            let status = resp.status().as_u16();
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            if !(200..300).contains(&status) {
                let text: String = text.chars().take(200).collect();
                return Err(format!("{method} {url}: HTTP {status}: {text}"));
            }
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        });
        job.await.map_err(|e| e.to_string())?
    }
}

/// A job with its own `environment:` (GitLab sets `CI_ENVIRONMENT_NAME`) gets a deployment from
/// GitLab itself, which follows the job's result: a second one from ferry would list every deploy
/// twice.
fn job_has_environment() -> bool {
    match std::env::var("CI_ENVIRONMENT_NAME") {
        Ok(name) if !name.trim().is_empty() => {
            tracing::info!(
                "this job deploys to GitLab environment {name}, which records the deployment: \
                 ferry creates none (gitlab.deployments)"
            );
            true
        }
        _ => false,
    }
}

fn warn(msg: &str) {
    crate::errln!("warning: {msg} (the deploy itself is not affected)");
    tracing::debug!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_body_has_the_documented_fields() {
        let mut ctx = DeployContext::placeholder();
        ctx.ref_name = "release-1".into();
        ctx.pipeline_id = Some("77".into());
        let b = status_body(
            &ctx,
            "staging",
            State::Running,
            Some("https://s.example"),
            None,
        );
        assert_eq!(b["state"], "running");
        assert_eq!(b["name"], "ferry/staging");
        assert_eq!(b["ref"], "release-1");
        assert_eq!(b["target_url"], "https://s.example");
        assert_eq!(b["pipeline_id"], 77);
        let b = status_body(
            &ctx,
            "staging",
            State::Failed,
            None,
            Some(Duration::from_secs(3)),
        );
        assert_eq!(b["state"], "failed");
        assert!(b.get("target_url").is_none());
    }

    #[test]
    fn project_paths_are_encoded() {
        assert_eq!(encode_project("42"), "42");
        assert_eq!(encode_project("group/sub/app"), "group%2Fsub%2Fapp");
    }
}
