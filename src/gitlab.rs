//! Reporting deploys to GitLab: a commit status `ferry/<env>` (running, then success, failed or
//! canceled, linking the environment URL) and, with `gitlab.deployments: true`, a deployment
//! through the Deployments API, unless the job has an `environment:` of its own (GitLab records
//! that one). It reports only when the token variable (`gitlab.token_env`, default
//! `FERRY_GITLAB_TOKEN`) is set. The token goes in the `PRIVATE-TOKEN` header, never follows a
//! redirect and is never printed. GitLab being down or refusing a request is a warning: it never
//! fails a deploy, and one that does not answer, or refuses the token, is asked nothing more that
//! run. The blocking HTTP calls run on tokio's blocking pool.

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
    /// Stopped by Ctrl-C or SIGTERM (a cancelled job).
    Canceled,
}

impl State {
    /// The word both APIs use.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Success => "success",
            State::Failed => "failed",
            State::Canceled => "canceled",
        }
    }
}

/// The GitLab deployment this run created, as far as ferry knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deployment {
    None,
    Created(u64),
    /// Its creation got no usable answer (a timeout, no id): it may exist, so ferry makes no
    /// second one.
    Unknown,
}

/// Why a request failed: whether the next ones are worth making.
#[derive(Debug)]
struct CallError {
    message: String,
    /// GitLab did not answer, or refused the token: every other request would fail alike.
    fatal: bool,
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
    /// The job's pipeline, when the commit is the job's own (a pipeline matches only its sha).
    pipeline: Option<u64>,
    deployments: bool,
    deployment: Mutex<Deployment>,
    /// Set once GitLab did not answer or refused the token: the run reports nothing more.
    gave_up: Mutex<bool>,
    /// The HTTP client: made once, with the timeout, no redirects (one would carry the token
    /// to wherever it points) and `CI_SERVER_TLS_CA_FILE`'s certificates, if set (a GitLab with
    /// its own CA).
    agent: ureq::Agent,
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

/// The commit status request body: `POST /projects/:id/statuses/:sha`. With `pipeline` (the
/// job's, whose sha this is) the status joins it, and no `ref` is sent: GitLab finds a pipeline
/// by sha, ref and id together, and a merge request pipeline's ref is not the branch's.
pub fn status_body(
    ctx: &DeployContext,
    env: &str,
    state: State,
    target_url: Option<&str>,
    took: Option<Duration>,
    pipeline: Option<u64>,
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
        "name": format!("ferry/{env}"),
        "description": description,
    });
    if let Some(u) = target_url {
        body["target_url"] = u.into();
    }
    match pipeline {
        Some(p) => body["pipeline_id"] = p.into(),
        None => body["ref"] = ctx.ref_name.clone().into(),
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
        // (GitLab refuses a commit status whose link is no URL: better one without a link.)
        let target_url = target_url.filter(|u| {
            let ok = is_url(u);
            if !ok {
                warn(&format!(
                    "the environment's url `{u}` is not an http(s) URL GitLab takes: reporting \
                     without a link"
                ));
            }
            ok
        });
        // (`--sha` in a CI job names a commit its pipeline is not for.)
        let pipeline = ctx
            .pipeline_id
            .as_deref()
            .and_then(|p| p.parse::<u64>().ok())
            .filter(|_| var("CI_COMMIT_SHA").is_some_and(|sha| sha == ctx.sha));
        let deploy_env = match crate::status::is_per_branch(pb, env) {
            true => format!("{env}/{}", ctx.ref_slug),
            false => env.into(),
        };
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .max_redirects(0);
        if let Some(f) = var("CI_SERVER_TLS_CA_FILE") {
            match ca_file(&f) {
                Ok(certs) => {
                    let roots = ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs));
                    config = config
                        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build());
                }
                Err(e) => warn(&format!(
                    "cannot use CI_SERVER_TLS_CA_FILE ({f}): {e}; GitLab's certificate is checked \
                     against the public CAs"
                )),
            }
        }
        Some(Reporter {
            project_url: format!(
                "{}/projects/{}",
                api.trim_end_matches('/'),
                encode_project(&project)
            ),
            token,
            env: env.into(),
            deployments: settings.is_some_and(|s| s.deployments)
                && !job_has_environment(&deploy_env),
            deploy_env,
            ctx: ctx.clone(),
            target_url,
            pipeline,
            deployment: Mutex::new(Deployment::None),
            gave_up: Mutex::new(false),
            agent: config.build().into(),
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
            self.pipeline,
        );
        let url = format!("{}/statuses/{}", self.project_url, self.ctx.sha);
        if let Err(e) = self.call("POST", url, body).await {
            self.warn_failed(
                &format!("cannot set the commit status ferry/{}", self.env),
                e,
            );
        }
        if !self.deployments {
            return;
        }
        let existing = *self.deployment.lock().unwrap();
        if let (Deployment::None, Some(url)) = (existing, &self.target_url)
            && let Err(e) = self.environment_url(url).await
        {
            let what = format!(
                "cannot set the URL of GitLab environment {}",
                self.deploy_env
            );
            self.warn_failed(&what, e);
        }
        let r = match existing {
            Deployment::None => {
                let body = json!({
                    "environment": self.deploy_env,
                    "sha": self.ctx.sha,
                    "ref": self.ctx.ref_name,
                    "tag": self.ctx.is_tag,
                    "status": state.as_str(),
                });
                let url = format!("{}/deployments", self.project_url);
                let created = self.call("POST", url, body).await;
                let known = match &created {
                    Ok(v) => v["id"]
                        .as_u64()
                        .map_or(Deployment::Unknown, Deployment::Created),
                    Err(e) if e.fatal => Deployment::Unknown,
                    Err(_) => Deployment::None,
                };
                *self.deployment.lock().unwrap() = known;
                created.and_then(|_| match known {
                    Deployment::Unknown => Err(CallError {
                        message: "GitLab's answer has no deployment id; its status is not \
                                  updated after this"
                            .into(),
                        fatal: false,
                    }),
                    _ => Ok(()),
                })
            }
            Deployment::Created(id) => {
                let url = format!("{}/deployments/{id}", self.project_url);
                self.call("PUT", url, json!({"status": state.as_str()}))
                    .await
                    .map(|_| ())
            }
            // (Made, maybe, with no id known: a second would list this deploy twice.)
            Deployment::Unknown => Ok(()),
        };
        if let Err(e) = r {
            let what = format!("cannot update the GitLab deployment of {}", self.env);
            self.warn_failed(&what, e);
        }
    }

    /// Warn about a failed request, unless GitLab was given up on already; the first request
    /// that finds it unreachable, or the token refused, gives it up.
    fn warn_failed(&self, what: &str, e: CallError) {
        if e.message.is_empty() {
            return;
        }
        let rest = match e.fatal {
            true => "; not reporting the rest of this deploy to GitLab",
            false => "",
        };
        warn(&format!("{what}: {}{rest}", e.message));
    }

    /// Give the deployment's environment the playbook's `url` (its link in GitLab): the
    /// Deployments API takes none, so the Environments API makes or edits the environment first.
    async fn environment_url(&self, url: &str) -> Result<(), CallError> {
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
                let id = e["id"].as_u64().ok_or_else(|| CallError {
                    message: "the environment has no id".into(),
                    fatal: false,
                })?;
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

    /// One JSON request off the async threads; the parsed response body or why not. Once GitLab
    /// was given up on, none is made (an empty message: nothing more to say).
    async fn call(
        &self,
        method: &'static str,
        url: String,
        body: Value,
    ) -> Result<Value, CallError> {
        if *self.gave_up.lock().unwrap() {
            return Err(CallError {
                message: String::new(),
                fatal: true,
            });
        }
        let (token, agent) = (self.token.clone(), self.agent.clone());
        let job = tokio::task::spawn_blocking(move || -> Result<Value, CallError> {
            let failed = |message: String, fatal: bool| CallError { message, fatal };
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
            let mut resp = sent.map_err(|e| failed(format!("{method} {url}: {e}"), true))?;
            let status = resp.status().as_u16();
            if (300..400).contains(&status) {
                let to = resp
                    .headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                return Err(failed(
                    format!(
                        "{method} {url}: HTTP {status}, a redirect to {to}, which ferry does not \
                         follow with the token: set gitlab.url (or CI_API_V4_URL) to the API's \
                         own address"
                    ),
                    true,
                ));
            }
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            if !(200..300).contains(&status) {
                return Err(failed(
                    format!("{method} {url}: HTTP {status}: {}", excerpt(&text)),
                    status == 401,
                ));
            }
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        });
        let r = job
            .await
            .map_err(|e| CallError {
                message: e.to_string(),
                fatal: false,
            })
            .and_then(|r| r);
        if let Err(e) = &r
            && e.fatal
        {
            *self.gave_up.lock().unwrap() = true;
        }
        r
    }
}

/// An absolute http(s) URL with a host, no blanks and at most 255 characters: what GitLab
/// takes as a commit status's `target_url`.
fn is_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        && !u.chars().any(|c| c.is_whitespace() || c.is_control())
        && u.chars().count() <= 255
}

/// What an error response says, short: GitLab's JSON message, or the start of a page's text.
fn excerpt(body: &str) -> String {
    let body = body.trim();
    if body.starts_with('<') {
        return "(an HTML page: a proxy or load balancer answered, not GitLab's API)".into();
    }
    let line = body.lines().next().unwrap_or_default();
    let mut short: String = line.chars().take(200).collect();
    if short.len() < body.len() {
        short.push('…');
    }
    short
}

/// The certificates of a PEM file (`CI_SERVER_TLS_CA_FILE`).
fn ca_file(path: &str) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
            _ => None,
        })
        .collect();
    match certs.is_empty() {
        true => Err("no PEM certificate in it".into()),
        false => Ok(certs),
    }
}

/// A job with its own `environment:` (GitLab sets `CI_ENVIRONMENT_NAME`) gets a deployment of
/// that environment from GitLab itself, which follows the job's result: a second one from ferry
/// would list every deploy twice. Not with an `action:` that makes no deployment (`prepare`,
/// `verify`, `access`), nor for another environment than the job's.
fn job_has_environment(deploy_env: &str) -> bool {
    let name = std::env::var("CI_ENVIRONMENT_NAME").unwrap_or_default();
    let action = std::env::var("CI_ENVIRONMENT_ACTION").unwrap_or_default();
    let records =
        name.trim() == deploy_env && !["prepare", "verify", "access"].contains(&action.trim());
    if records {
        tracing::info!(
            "this job deploys to GitLab environment {name}, which records the deployment: \
             ferry creates none (gitlab.deployments)"
        );
    }
    records
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
            Some(77),
        );
        assert_eq!(b["state"], "running");
        assert_eq!(b["name"], "ferry/staging");
        assert_eq!(b["target_url"], "https://s.example");
        // (The pipeline says the ref: a merge request pipeline's is not the branch.)
        assert_eq!(b["pipeline_id"], 77);
        assert!(b.get("ref").is_none());
        let b = status_body(
            &ctx,
            "staging",
            State::Canceled,
            None,
            Some(Duration::from_secs(3)),
            None,
        );
        assert_eq!(b["state"], "canceled");
        assert_eq!(b["ref"], "release-1");
        assert!(b.get("target_url").is_none() && b.get("pipeline_id").is_none());
    }

    #[test]
    fn only_urls_gitlab_takes_are_links() {
        assert!(is_url("https://shop.example.com/review/x"));
        for bad in [
            "http://a b",
            "ftp://x",
            "https://",
            "shop.example.com",
            "http:///x",
        ] {
            assert!(!is_url(bad), "{bad}");
        }
        assert!(!is_url(&format!("https://x/{}", "a".repeat(300))));
    }

    #[test]
    fn error_pages_are_cut_short() {
        assert!(excerpt("<html><body>502 Bad Gateway</body></html>").contains("HTML page"));
        assert_eq!(
            excerpt("{\"message\":\"404 Not Found\"}"),
            "{\"message\":\"404 Not Found\"}"
        );
        assert!(excerpt(&"x".repeat(500)).ends_with('…'));
    }

    #[test]
    fn project_paths_are_encoded() {
        assert_eq!(encode_project("42"), "42");
        assert_eq!(encode_project("group/sub/app"), "group%2Fsub%2Fapp");
    }
}
