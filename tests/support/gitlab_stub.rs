//! A local stand-in for GitLab's REST API (v4), for the endpoints ferry calls. It checks every
//! request against GitLab's API documentation and records what did not match:
//! - `POST /projects/:id/statuses/:sha`: `state` required, one of pending, running, success, failed,
//!   canceled. Optional: `ref`, `name`/`context`, `target_url`, `description`, `coverage`,
//!   `pipeline_id`. 201 with the status.
//! - `POST /projects/:id/deployments`: `environment`, `sha`, `ref`, `tag` (boolean) and `status`
//!   (running, success, failed, canceled) required. 201 with the deployment and its `id`.
//! - A commit sha is 40 hex digits (SHA-1) or 64 (SHA-256); `ref`, `target_url` and
//!   `description` hold at most 255 characters, and `target_url` must be a URL (GitLab answers
//!   400 "must be a valid URL" to `http://a b`).
//! - `PUT /projects/:id/deployments/:deployment_id`: `status` required. 200. A deployment to an
//!   environment that does not exist creates it.
//! - `GET /projects/:id/environments`: optional `name` (exact) or `search`, not both. 200 with a
//!   list of `id`, `name`, `external_url`, `state`.
//! - `POST /projects/:id/environments`: `name` required and not taken; optional `external_url`,
//!   `tier`. 201.
//! - `PUT /projects/:id/environments/:environment_id`: optional `external_url`, `tier`. 200.
//!
//! Every request must carry the `PRIVATE-TOKEN` header (401 otherwise), and all but a GET a JSON
//! body. In `failing` mode every request gets a 500, as during an outage.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub token: Option<String>,
    pub body: Value,
}

/// How the stub answers.
enum Mode {
    /// As GitLab's API would, checking each request.
    Api,
    /// 500 to everything: an outage.
    Failing,
    /// 302 to the same path under another base URL.
    Redirect(String),
}

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    problems: Vec<String>,
    deployments: Vec<(u64, String)>,
    /// Environments: id, name, external URL.
    environments: Vec<(u64, String, Option<String>)>,
}

pub struct GitlabStub {
    /// The API base, as `CI_API_V4_URL` would hold it.
    pub api_url: String,
    state: Arc<Mutex<State>>,
}

impl GitlabStub {
    /// A stub that accepts `token` for project `project` (an id or a path).
    pub fn start(token: &str, project: &str) -> GitlabStub {
        GitlabStub::spawn(token, project, Mode::Api)
    }

    /// A stub that answers every request with a 500.
    pub fn failing(token: &str, project: &str) -> GitlabStub {
        GitlabStub::spawn(token, project, Mode::Failing)
    }

    /// A stub that answers every request with a redirect to the same path under `to` (a base
    /// URL), as a GitLab moved behind another name might.
    pub fn redirecting(token: &str, project: &str, to: &str) -> GitlabStub {
        GitlabStub::spawn(token, project, Mode::Redirect(to.to_string()))
    }

    fn spawn(token: &str, project: &str, mode: Mode) -> GitlabStub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let (st, token, project) = (state.clone(), token.to_string(), project.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let Some(req) = read_request(&mut conn) else {
                    continue;
                };
                let mut location = String::new();
                let (code, body) = match &mode {
                    Mode::Failing => {
                        st.lock().unwrap().requests.push(req);
                        (500, json!({"message": "500 Internal Server Error"}))
                    }
                    Mode::Redirect(to) => {
                        location = format!("Location: {to}{}\r\n", req.path);
                        st.lock().unwrap().requests.push(req);
                        (302, json!({}))
                    }
                    Mode::Api => handle(&st, &token, &project, req),
                };
                let text = body.to_string();
                let reason = match code {
                    200 => "OK",
                    201 => "Created",
                    302 => "Found",
                    400 => "Bad Request",
                    401 => "Unauthorized",
                    404 => "Not Found",
                    _ => "Internal Server Error",
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} {reason}\r\n{location}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        GitlabStub {
            api_url: format!("http://127.0.0.1:{port}/api/v4"),
            state,
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests that did not match the documented API.
    pub fn problems(&self) -> Vec<String> {
        self.state.lock().unwrap().problems.clone()
    }

    /// An environment without an external URL, as a deployment that names it makes one.
    pub fn add_environment(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        let id = 1 + s.environments.len() as u64;
        s.environments.push((id, name.to_string(), None));
    }

    /// Environments by name, and their external URL.
    pub fn environments(&self) -> Vec<(String, Option<String>)> {
        let s = self.state.lock().unwrap();
        s.environments
            .iter()
            .map(|(_, n, u)| (n.clone(), u.clone()))
            .collect()
    }

    /// Deployments and their current status, in creation order.
    pub fn deployments(&self) -> Vec<(u64, String)> {
        self.state.lock().unwrap().deployments.clone()
    }
}

fn read_request(conn: &mut std::net::TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut token = None;
    let mut length = 0usize;
    let mut content_type = String::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        let v = v.trim().to_string();
        match k.to_ascii_lowercase().as_str() {
            "private-token" => token = Some(v),
            "content-length" => length = v.parse().ok()?,
            "content-type" => content_type = v,
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let body = if content_type.starts_with("application/json") {
        serde_json::from_slice(&body).unwrap_or(Value::String("<invalid json>".into()))
    } else {
        Value::String(format!("<content-type {content_type:?}>"))
    };
    Some(Request {
        method,
        path,
        token,
        body,
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let (b'%', Some(x)) = (b[i], hex) {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(st: &Mutex<State>, token: &str, project: &str, req: Request) -> (u16, Value) {
    let mut s = st.lock().unwrap();
    s.requests.push(req.clone());
    let mut problems = Vec::new();
    if req.token.as_deref() != Some(token) {
        s.problems.push(format!(
            "{} {}: missing or wrong PRIVATE-TOKEN",
            req.method, req.path
        ));
        return (401, json!({"message": "401 Unauthorized"}));
    }
    let empty = serde_json::Map::new();
    let body = match req.body.as_object() {
        Some(b) => b,
        None if req.method == "GET" => &empty,
        None => {
            s.problems.push(format!(
                "{} {}: body is not a JSON object: {}",
                req.method, req.path, req.body
            ));
            return (400, json!({"message": "body must be JSON"}));
        }
    };
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let query: Vec<(String, String)> = query
        .split('&')
        .filter(|q| !q.is_empty())
        .map(|q| {
            let (k, v) = q.split_once('=').unwrap_or((q, ""));
            (decode(k), decode(v))
        })
        .collect();
    let segs: Vec<&str> = path.split('/').collect();
    // ["", "api", "v4", "projects", ID, ...]
    if segs.len() < 6 || segs[1] != "api" || segs[2] != "v4" || segs[3] != "projects" {
        s.problems
            .push(format!("unknown endpoint {} {}", req.method, req.path));
        return (404, json!({"message": "404 Not Found"}));
    }
    if decode(segs[4]) != project {
        problems.push(format!("project `{}` is not `{project}`", decode(segs[4])));
    }
    let str_field = |k: &str| body.get(k).and_then(Value::as_str);
    let one_of = |k: &str, allowed: &[&str], problems: &mut Vec<String>| match str_field(k) {
        Some(v) if allowed.contains(&v) => {}
        other => problems.push(format!("`{k}` must be one of {allowed:?}, got {other:?}")),
    };
    let only = |allowed: &[&str], problems: &mut Vec<String>| {
        for k in body.keys() {
            if !allowed.contains(&k.as_str()) {
                problems.push(format!("undocumented field `{k}`"));
            }
        }
    };
    let result = match (req.method.as_str(), &segs[5..]) {
        ("POST", ["statuses", sha]) => {
            if ![40, 64].contains(&sha.len()) || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                problems.push(format!("`{sha}` is not a commit sha"));
            }
            for k in ["ref", "target_url", "description"] {
                if str_field(k).is_some_and(|v| v.chars().count() > 255) {
                    problems.push(format!("`{k}` is longer than 255 characters"));
                }
            }
            one_of(
                "state",
                &["pending", "running", "success", "failed", "canceled"],
                &mut problems,
            );
            only(
                &[
                    "state",
                    "ref",
                    "name",
                    "context",
                    "target_url",
                    "description",
                    "coverage",
                    "pipeline_id",
                ],
                &mut problems,
            );
            if let Some(u) = body.get("target_url")
                && !u.as_str().is_some_and(is_url)
            {
                problems.push(format!("target_url {u} is not a URL"));
            }
            if body.get("pipeline_id").is_some_and(|p| !p.is_u64()) {
                problems.push("pipeline_id must be an integer".into());
            }
            (
                201,
                json!({"id": s.requests.len(), "sha": sha, "status": str_field("state")}),
            )
        }
        ("POST", ["deployments"]) => {
            for k in ["environment", "sha", "ref"] {
                if str_field(k).is_none_or(str::is_empty) {
                    problems.push(format!("`{k}` is required"));
                }
            }
            if !body.get("tag").is_some_and(Value::is_boolean) {
                problems.push("`tag` (boolean) is required".into());
            }
            one_of(
                "status",
                &["running", "success", "failed", "canceled"],
                &mut problems,
            );
            only(
                &["environment", "sha", "ref", "tag", "status"],
                &mut problems,
            );
            let id = 100 + s.deployments.len() as u64;
            let status = str_field("status").unwrap_or("").to_string();
            s.deployments.push((id, status));
            let env = str_field("environment").unwrap_or("").to_string();
            if !s.environments.iter().any(|e| e.1 == env) {
                let eid = 1 + s.environments.len() as u64;
                s.environments.push((eid, env, None));
            }
            (
                201,
                json!({"id": id, "iid": id, "ref": str_field("ref"), "sha": str_field("sha")}),
            )
        }
        ("PUT", ["deployments", id]) => {
            one_of(
                "status",
                &["running", "success", "failed", "canceled"],
                &mut problems,
            );
            only(&["status"], &mut problems);
            let status = str_field("status").unwrap_or("").to_string();
            match s.deployments.iter_mut().find(|(d, _)| d.to_string() == *id) {
                Some(d) => {
                    d.1 = status;
                    (200, json!({"id": d.0, "status": d.1}))
                }
                None => {
                    problems.push(format!("no deployment {id}"));
                    (404, json!({"message": "404 Deployment Not Found"}))
                }
            }
        }
        ("GET", ["environments"]) => {
            let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
            if get("name").is_some() && get("search").is_some() {
                problems.push("`name` and `search` are mutually exclusive".into());
            }
            for (k, _) in &query {
                if !["name", "search", "states", "page", "per_page"].contains(&k.as_str()) {
                    problems.push(format!("undocumented parameter `{k}`"));
                }
            }
            let list: Vec<Value> = s
                .environments
                .iter()
                .filter(|e| get("name").is_none_or(|n| e.1 == n))
                .filter(|e| get("search").is_none_or(|n| e.1.contains(n)))
                .map(|e| json!({"id": e.0, "name": e.1, "external_url": e.2, "state": "available"}))
                .collect();
            (200, Value::Array(list))
        }
        ("POST", ["environments"]) => {
            only(&["name", "external_url", "tier"], &mut problems);
            let name = str_field("name").unwrap_or("").to_string();
            if name.is_empty() {
                problems.push("`name` is required".into());
            } else if s.environments.iter().any(|e| e.1 == name) {
                problems.push(format!("environment `{name}` has already been taken"));
            }
            let url = str_field("external_url").map(str::to_string);
            if url.as_deref().is_some_and(|u| !is_url(u)) {
                problems.push(format!("external_url {url:?} is not a URL"));
            }
            let id = 1 + s.environments.len() as u64;
            if problems.is_empty() {
                s.environments.push((id, name.clone(), url.clone()));
            }
            (201, json!({"id": id, "name": name, "external_url": url}))
        }
        ("PUT", ["environments", id]) => {
            only(&["external_url", "tier"], &mut problems);
            let url = str_field("external_url").map(str::to_string);
            if url.as_deref().is_some_and(|u| !is_url(u)) {
                problems.push(format!("external_url {url:?} is not a URL"));
            }
            match s.environments.iter_mut().find(|e| e.0.to_string() == *id) {
                Some(e) => {
                    if url.is_some() {
                        e.2 = url;
                    }
                    (200, json!({"id": e.0, "name": e.1, "external_url": e.2}))
                }
                None => {
                    problems.push(format!("no environment {id}"));
                    (404, json!({"message": "404 Environment Not Found"}))
                }
            }
        }
        _ => {
            problems.push("unknown endpoint".into());
            (404, json!({"message": "404 Not Found"}))
        }
    };
    for p in problems.iter() {
        s.problems.push(format!("{} {}: {p}", req.method, req.path));
    }
    if problems.is_empty() {
        result
    } else {
        (400, json!({"message": problems}))
    }
}

/// An absolute http(s) URL with a host and no blanks, as GitLab's URL validation wants.
fn is_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    rest.is_some_and(|r| {
        !r.is_empty()
            && !r.starts_with('/')
            && !u.chars().any(|c| c.is_whitespace() || c.is_control())
    })
}
