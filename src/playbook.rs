//! The playbook: the YAML file a team commits that says what ferry deploys, where, and when.
//!
//! This module owns the file format (serde types with `deny_unknown_fields`) and loading with errors that
//! name the file, line and column. Everything downstream works on these validated types; nothing else
//! parses YAML.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A parsed, validated playbook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Playbook {
    /// The application name: it names locks, ledgers and container name prefixes.
    pub app: String,
    /// SSH settings shared by every environment (each environment can override them).
    #[serde(default)]
    pub ssh: SshSettings,
    /// Variables usable as `${name}` in templates.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Which ref deploys to which environment. First match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Named environments (staging, production, publish, ...).
    pub environments: BTreeMap<String, Environment>,
    /// Where GitLab status goes, if anywhere.
    #[serde(default)]
    pub gitlab: Option<GitlabSettings>,
    /// The file this playbook came from (set by [`load`]).
    #[serde(skip)]
    pub path: PathBuf,
}

/// SSH connection settings. Every field is optional so that environments and hosts can override
/// one field at a time; [`SshSettings::merged`] layers them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSettings {
    pub user: Option<String>,
    pub port: Option<u16>,
    /// Where the private key comes from.
    pub key: Option<KeySource>,
    /// Where trusted host keys come from.
    pub known_hosts: Option<KnownHostsSource>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// How many hosts to work on at once.
    pub forks: Option<usize>,
    /// A bastion, as `user@host:port` (like ssh_config's ProxyJump).
    pub proxy_jump: Option<String>,
}

impl SshSettings {
    /// `self` with every unset field taken from `base`.
    pub fn merged(&self, base: &SshSettings) -> SshSettings {
        SshSettings {
            user: self.user.clone().or_else(|| base.user.clone()),
            port: self.port.or(base.port),
            key: self.key.clone().or_else(|| base.key.clone()),
            known_hosts: self
                .known_hosts
                .clone()
                .or_else(|| base.known_hosts.clone()),
            connect_timeout: self.connect_timeout.or(base.connect_timeout),
            forks: self.forks.or(base.forks),
            proxy_jump: self.proxy_jump.clone().or_else(|| base.proxy_jump.clone()),
        }
    }
}

/// Where ferry finds the SSH private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Try `SSH_PRIVATE_KEY`, then ssh-agent (the default).
    Auto,
    /// The `SSH_PRIVATE_KEY` environment variable (key text or base64 of it).
    Env,
    /// ssh-agent via `SSH_AUTH_SOCK`.
    Agent,
    /// A key file.
    File(PathBuf),
}

/// Where ferry finds trusted host keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownHostsSource {
    /// `SSH_KNOWN_HOSTS` if set, else `~/.ssh/known_hosts` (the default).
    Auto,
    /// The `SSH_KNOWN_HOSTS` environment variable (known_hosts content).
    Env,
    /// A known_hosts file.
    File(PathBuf),
}

impl<'de> Deserialize<'de> for KeySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "auto" => Ok(KeySource::Auto),
            "env" => Ok(KeySource::Env),
            "agent" => Ok(KeySource::Agent),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(KeySource::File(PathBuf::from(p))),
                _ => Err(serde::de::Error::custom(format!(
                    "invalid key source `{s}`: expected `auto`, `env`, `agent` or `file:PATH`"
                ))),
            },
        }
    }
}

impl<'de> Deserialize<'de> for KnownHostsSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "auto" => Ok(KnownHostsSource::Auto),
            "env" => Ok(KnownHostsSource::Env),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(KnownHostsSource::File(PathBuf::from(p))),
                _ => Err(serde::de::Error::custom(format!(
                    "invalid known_hosts source `{s}`: expected `auto`, `env` or `file:PATH`"
                ))),
            },
        }
    }
}

/// A ref rule: `branch` or `tag` glob (`*` matches any run of characters, `?` one) to environments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub branch: Option<String>,
    pub tag: Option<String>,
    /// The environments to deploy; empty means "deploy nothing for this ref".
    #[serde(default, deserialize_with = "one_or_many")]
    pub deploy: Vec<String>,
}

/// One environment: hosts, where things live on them, and the steps of a deploy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// Shown as the GitLab environment URL and in status.
    pub url: Option<String>,
    #[serde(default)]
    pub ssh: SshSettings,
    /// Base directory on the hosts: relative `sync.to` paths and ferry's state (`.ferry/`) live here.
    /// Defaults to `/srv/<app>`. May use templates.
    pub root: Option<String>,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Docker settings for this environment's hosts.
    #[serde(default)]
    pub docker: DockerSettings,
    pub hosts: Vec<HostEntry>,
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Steps run by `ferry stop` (e.g. removing a review app).
    #[serde(default)]
    pub on_stop: Vec<Step>,
}

/// How `docker` is invoked on a host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSettings {
    /// The command, as argv (`["sudo", "docker"]`, `["podman"]`). Defaults to `["docker"]`.
    #[serde(default, deserialize_with = "opt_argv")]
    pub command: Option<Vec<String>>,
}

impl DockerSettings {
    pub fn merged(&self, base: &DockerSettings) -> DockerSettings {
        DockerSettings {
            command: self.command.clone().or_else(|| base.command.clone()),
        }
    }

    pub fn argv(&self) -> Vec<String> {
        self.command
            .clone()
            .unwrap_or_else(|| vec!["docker".into()])
    }
}

/// A host: `user@host:port` shorthand or a map with overrides. The address may use `${env.NAME}`
/// (the controller's environment) so that one playbook serves CI and local test hosts; it is then
/// expanded and checked by the inventory.
#[derive(Debug, Clone)]
pub struct HostEntry {
    /// Display name, used in output, ledgers and `${host}`. Defaults to the (expanded) address.
    pub name: Option<String>,
    /// `user@host:port` as written (possibly templated).
    pub address: String,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub ssh: SshSettings,
    pub vars: BTreeMap<String, String>,
    pub docker: DockerSettings,
}

impl HostEntry {
    /// The name as written: the explicit `name:`, else the address text.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostMap {
    name: Option<String>,
    host: String,
    user: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    ssh: SshSettings,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    #[serde(default)]
    docker: DockerSettings,
}

impl<'de> Deserialize<'de> for HostEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The map form is read straight from the document (not through serde's `untagged`, which
        // hides its errors, nor a buffer, which loses their places): a bad key or value in it is
        // reported where it stands.
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HostMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a host: `user@host:port` or a map with `host:`")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<HostMap, E> {
                Ok(HostMap {
                    name: None,
                    host: s.to_string(),
                    user: None,
                    port: None,
                    ssh: SshSettings::default(),
                    vars: BTreeMap::new(),
                    docker: DockerSettings::default(),
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<HostMap, A::Error> {
                HostMap::deserialize(serde::de::value::MapAccessDeserializer::new(m))
            }
        }
        let m = d.deserialize_any(V)?;
        // Check literal addresses now, where the error can point at the line; templated ones later.
        if !m.host.contains("${") {
            parse_address(&m.host).map_err(serde::de::Error::custom)?;
        }
        Ok(HostEntry {
            name: m.name,
            address: m.host,
            user: m.user,
            port: m.port,
            ssh: m.ssh,
            vars: m.vars,
            docker: m.docker,
        })
    }
}

/// `user@host:port`, each part but the host optional. IPv6 literals go in brackets: `[::1]:2222`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

pub fn parse_address(s: &str) -> Result<Address, String> {
    let (user, rest) = match s.rsplit_once('@') {
        Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
        Some(_) => return Err(format!("invalid host `{s}`: empty user before `@`")),
        None => (None, s),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (h, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("invalid host `{s}`: missing `]`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(s, p)?),
            None if after.is_empty() => None,
            None => {
                return Err(format!(
                    "invalid host `{s}`: unexpected `{after}` after `]`"
                ));
            }
        };
        (h.to_string(), port)
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(parse_port(s, p)?)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("invalid host `{s}`: expected `user@host:port`"));
    }
    Ok(Address { user, host, port })
}

fn parse_port(whole: &str, p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid port `{p}` in `{whole}`: expected 1-65535"))
}

/// One step of a deploy. Written in YAML as a one-key map: `- sync: {...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Ship a local directory to a path on the hosts.
    Sync(SyncStep),
    /// `docker login` with the password on stdin.
    DockerLogin(DockerLoginStep),
    /// Run or replace the app's service container, health-gated.
    Container(ContainerSpec),
    /// A long-lived side container (database, cache): started if missing or changed, else left alone.
    Accessory(ContainerSpec),
    /// `docker build` from a context directory on the host.
    DockerBuild(DockerBuildStep),
    /// `docker tag SOURCE TARGET`.
    DockerTag(DockerTagStep),
    /// `docker push IMAGE`, unless the registry has that tag already (another image).
    DockerPush(DockerPushStep),
    /// `docker pull IMAGE`.
    DockerPull(ImageStep),
    /// Keep the newest N images of a repository; never remove one a container uses.
    DockerPrune(DockerPruneStep),
    /// Remove a container (for `on_stop`).
    DockerRemove(DockerRemoveStep),
    /// Remove a synced path and its releases (for `on_stop`).
    SyncRemove(SyncRemoveStep),
    /// Run a command on the hosts.
    Run(RunStep),
}

impl Step {
    /// A short label for logs and section names.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Sync(_) => "sync",
            Step::DockerLogin(_) => "docker_login",
            Step::Container(_) => "container",
            Step::Accessory(_) => "accessory",
            Step::DockerBuild(_) => "docker_build",
            Step::DockerTag(_) => "docker_tag",
            Step::DockerPush(_) => "docker_push",
            Step::DockerPull(_) => "docker_pull",
            Step::DockerPrune(_) => "docker_prune",
            Step::DockerRemove(_) => "docker_remove",
            Step::SyncRemove(_) => "sync_remove",
            Step::Run(_) => "run",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// `to` is a symlink to an immutable release directory, switched atomically (the default).
    #[default]
    Release,
    /// Files are written to temp names and renamed into `to`, a real directory.
    InPlace,
}

/// Which files a sync step's stream gzips.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compress {
    /// Every file whose content compresses, except in a bulk transfer (64 MiB of content or
    /// more, such as a first deploy): there files of 8 KiB or more go as they are, as with
    /// `rsync -a`, since compressing them costs both ends more CPU than a fast link saves, and
    /// smaller ones as far as the bytes deflating the rest saves pay for.
    #[default]
    Auto,
    /// Every file whose content compresses, however much there is: for slow links.
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncStep {
    /// Local directory (relative to the working directory). May use templates.
    pub from: String,
    /// Remote path the web server or app reads (relative paths are under the environment's root).
    pub to: String,
    #[serde(default)]
    pub mode: SyncMode,
    /// gitignore-style patterns of local paths not to ship.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Releases to keep (the live one and the rollback target are always kept).
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Delete files on the host that are not in `from` (`false`: in-place mode only; a release is
    /// always the build alone).
    #[serde(default = "default_true")]
    pub delete: bool,
    /// Take over an existing plain directory at `to` on the first deploy.
    #[serde(default)]
    pub adopt: bool,
    /// Which files the stream gzips.
    #[serde(default)]
    pub compress: Compress,
}

fn default_keep() -> usize {
    5
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRemoveStep {
    pub to: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerLoginStep {
    /// Registry host (`registry.example.com:5000`).
    pub registry: String,
    pub user: String,
    /// Name of the controller's environment variable holding the password.
    pub password_env: String,
}

/// A container to run. Every field of a `docker run` that deploys use has a place here.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Command and arguments (argv). Omit to use the image's.
    #[serde(default, deserialize_with = "opt_argv")]
    pub command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "opt_argv")]
    pub entrypoint: Option<Vec<String>>,
    /// `HOST:CONTAINER[/proto]` or `IP:HOST:CONTAINER`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Plain environment values (templated).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Container variable to the controller's environment variable that holds its secret value.
    /// Values are sent on stdin into an env file, never on a command line.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// An env file on the host.
    pub env_file: Option<String>,
    /// `SOURCE:TARGET[:ro]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    pub network: Option<String>,
    /// `no`, `always`, `unless-stopped`, `on-failure[:N]`.
    pub restart: Option<String>,
    pub log_driver: Option<String>,
    #[serde(default)]
    pub log_opts: BTreeMap<String, String>,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    #[serde(default)]
    pub extra_hosts: Vec<String>,
    pub memory: Option<String>,
    pub cpus: Option<String>,
    pub health: Option<HealthCheck>,
    /// Take over a container of this name that ferry did not start for this app and environment
    /// (it is kept as `NAME.ferry-prev`, as ferry's own would be).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
    /// Per-host overrides, keyed by host name. Only the fields given replace the base spec's.
    #[serde(default)]
    pub hosts: BTreeMap<String, serde_json::Value>,
}

impl ContainerSpec {
    /// The spec for `host`: its overrides in `hosts` (the fields given replace the base spec's),
    /// and no `hosts` left. Errors say what is wrong with the override.
    pub fn for_host(&self, host: &str) -> Result<ContainerSpec, String> {
        let Some(over) = self.hosts.get(host) else {
            let mut s = self.clone();
            s.hosts.clear();
            return Ok(s);
        };
        let serde_json::Value::Object(over) = over else {
            return Err("expected a map of container fields".into());
        };
        let mut base = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let obj = base.as_object_mut().expect("a struct serializes to a map");
        obj.remove("hosts");
        for (k, v) in over {
            if k == "hosts" {
                return Err("`hosts` cannot be overridden per host".into());
            }
            obj.insert(k.clone(), v.clone());
        }
        serde_json::from_value(base).map_err(|e| e.to_string())
    }
}

/// How ferry decides a new container is healthy.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `docker` (the image's HEALTHCHECK state), `http`, or `tcp` (probes run on the host).
    #[serde(rename = "type")]
    pub kind: HealthKind,
    /// For http: a URL such as `http://127.0.0.1:8080/health`.
    pub url: Option<String>,
    /// For tcp: `host:port`.
    pub address: Option<String>,
    /// How long to wait for health in total.
    #[serde(default = "default_health_timeout", deserialize_with = "duration")]
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Time between probes (see [`HealthCheck::interval`]).
    #[serde(default, deserialize_with = "opt_duration")]
    #[serde(
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
}

impl HealthCheck {
    /// Time between probes: as given, or 1s (the timeout, if that is shorter).
    pub fn interval(&self) -> Duration {
        self.interval
            .unwrap_or_else(|| Duration::from_secs(1).min(self.timeout))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    Docker,
    Http,
    Tcp,
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(60)
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerBuildStep {
    /// Context directory on the host (typically a sync step's `to`).
    pub context: String,
    /// Image name to build.
    pub tag: String,
    /// Dockerfile path, relative to the context.
    pub file: Option<String>,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    #[serde(default = "default_build_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_build_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerTagStep {
    pub source: String,
    pub target: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageStep {
    pub image: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerPushStep {
    pub image: String,
    /// Replace a tag the registry already has with another image (a published tag is kept by
    /// default: a rerun of a tag's pipeline must not change what it names).
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerPruneStep {
    /// Repository whose images are pruned, e.g. `registry:5000/shop`.
    pub repository: String,
    pub keep: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerRemoveStep {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunStep {
    /// argv (each element quoted for the remote shell) or one string run by `sh -c`.
    pub command: Command,
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Environment variables of the command (name -> the controller variable holding the value),
    /// sent over stdin, never on its command line, and masked in its output.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Argv(Vec<String>),
    Shell(String),
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            V(Vec<String>),
        }
        match expected(Raw::deserialize(d), "a command line or a list of words")? {
            Raw::S(s) => Ok(Command::Shell(s)),
            Raw::V(v) if !v.is_empty() => Ok(Command::Argv(v)),
            Raw::V(_) => Err(serde::de::Error::custom("command must not be empty")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitlabSettings {
    /// API base, default `$CI_API_V4_URL`.
    pub url: Option<String>,
    /// Project id or path, default `$CI_PROJECT_ID`.
    pub project: Option<String>,
    /// Environment variable holding the token (default `FERRY_GITLAB_TOKEN`).
    pub token_env: Option<String>,
    /// Also create and update a deployment through the Deployments API.
    #[serde(default)]
    pub deployments: bool,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(
        match expected(Raw::deserialize(d), "a name or a list of names")? {
            Raw::One(s) => vec![s],
            Raw::Many(v) => v,
        },
    )
}

fn opt_argv<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(
        match expected(
            Option::<Raw>::deserialize(d),
            "a command line or a list of words",
        )? {
            None => None,
            Some(Raw::One(s)) => Some(shlex::split(&s).ok_or_else(|| {
                serde::de::Error::custom(format!("cannot split `{s}` into words"))
            })?),
            Some(Raw::Many(v)) => Some(v),
        },
    )
}

/// The longest duration a playbook or flag may give (ten years): longer ones are typing errors.
const MAX_DURATION: Duration = Duration::from_secs(3650 * 86400);

/// Parse `90s`, `5m`, `1h30m`, `250ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs))
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| {
                format!("duration `{s}` is longer than ferry waits for anything (3650d)")
            });
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration `{s}`: expected e.g. `30s`, `5m`, `1h30m`"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration `{s}`"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86400).map(Duration::from_secs),
            _ => {
                return Err(format!(
                    "invalid duration `{s}`: unknown unit `{unit}` (use ms, s, m, h, d)"
                ));
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| {
                format!("duration `{s}` is longer than ferry waits for anything (3650d)")
            })?;
    }
    Ok(total)
}

pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match expected(Raw::deserialize(d), "a duration such as 30s, 5m or 1h30m")? {
        Raw::N(n) => Ok(Duration::from_secs(n)),
        Raw::S(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    struct W(#[serde(deserialize_with = "duration")] Duration);
    Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
}

/// A playbook that failed to load, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum PlaybookError {
    #[error("cannot read playbook {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    /// Valid YAML whose fields do not fit together; `at` is the line and column of the node at
    /// fault, when it could be found.
    #[error("{path}:{}{message}", at.map(|(l, c)| format!("{l}:{c}: ")).unwrap_or_else(|| " ".into()))]
    Invalid {
        path: PathBuf,
        at: Option<(u64, u64)>,
        message: String,
    },
}

/// Read and validate a playbook file.
pub fn load(path: &Path) -> Result<Playbook, PlaybookError> {
    let bytes = std::fs::read(path).map_err(|source| PlaybookError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let valid = std::str::from_utf8(valid).expect("valid up to here");
        let (line, column) = line_column(valid, valid.len());
        PlaybookError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: "a byte that is not UTF-8: save the playbook as UTF-8".into(),
        }
    })?;
    parse(&text, path)
}

/// Parse playbook text; `path` is only used in messages.
pub fn parse(text: &str, path: &Path) -> Result<Playbook, PlaybookError> {
    let mut pb: Playbook = serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        PlaybookError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: in_our_words(&first_line(&e.to_string())),
        }
    })?;
    pb.path = path.to_path_buf();
    validate(&pb).map_err(|Invalid { at, message }| PlaybookError::Invalid {
        path: path.to_path_buf(),
        at: locate(text, &at),
        message,
    })?;
    Ok(pb)
}

/// serde-saphyr's messages carry a source snippet after the first line, and may start with their
/// own `error: line L column C: `; we print our own location.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s).trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line.split_once(": ") {
        Some((at, rest))
            if at.starts_with("line ")
                && at.contains(" column ")
                && at.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ') =>
        {
            rest.to_string()
        }
        _ => line.to_string(),
    }
}

/// serde-saphyr's terse or library-facing messages, in words a playbook's author can act on.
fn in_our_words(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return format!("`{key}` is set twice in this mapping; keep one");
    }
    let number = |range: &str| format!("expected a whole number {range}");
    match msg {
        "expected sequence start" => {
            "expected a list (`[a, b]`, or lines starting with `- `)".into()
        }
        "expected mapping start" => {
            "expected a mapping (`{key: value}`, or `key: value` lines)".into()
        }
        "invalid u8" => number("from 0 to 255"),
        "invalid u16" => number("from 0 to 65535"),
        "invalid u32" | "invalid u64" | "invalid usize" => number("(0 or more)"),
        _ => msg.to_string(),
    }
}

/// `Raw::deserialize`'s error for an untagged `Raw` (which names the internal type) replaced by
/// what the value should have been.
fn expected<T, E: serde::de::Error>(r: Result<T, E>, what: &str) -> Result<T, E> {
    r.map_err(|_| E::custom(format!("expected {what}")))
}

/// One step of a path from the document's root to a node: a map key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

/// A cross-field error and the node it is about (the deepest part of `at` that exists).
#[derive(Debug)]
struct Invalid {
    at: Vec<Seg>,
    message: String,
}

/// A YAML node with where each of its children starts: read again, leniently, only to point a
/// cross-field error at its line and column (serde keeps no positions in the validated types).
#[derive(Debug, Default)]
enum Node {
    Map(Vec<(String, serde_saphyr::Spanned<Node>)>),
    Seq(Vec<serde_saphyr::Spanned<Node>>),
    #[default]
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<serde_json::Value>()? {
                    let k = match k {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    out.push((k, m.next_value()?));
                }
                Ok(Node::Map(out))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = s.next_element()? {
                    out.push(n);
                }
                Ok(Node::Seq(out))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
        }
        d.deserialize_any(V)
    }
}

/// Where `needle` stands (not escaped as `$$`) in step `index` of environment `env`'s `section`
/// (`steps`, `on_stop`) of the playbook at `path`, or where that step starts: to point an error
/// found after loading (a template) at its line and column.
pub fn locate_in_step(
    path: &Path,
    env: &str,
    section: &str,
    index: usize,
    needle: &str,
) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let root: serde_saphyr::Spanned<Node> = serde_saphyr::from_str(&text).ok()?;
    let step = |i: usize| {
        let at = [key("environments"), key(env), key(section), Seg::Index(i)];
        let (node, found) = descend(&root, &at);
        let l = node.referenced;
        (found && l.line() > 0).then(|| (l.line(), l.column()))
    };
    let (line, column) = step(index)?;
    let start = offset(&text, line, column);
    // (The step ends where the next begins; the last one, at the end of the file.)
    let end = step(index + 1).map_or(text.len(), |(l, c)| offset(&text, l, c));
    let Some(hit) = find_unescaped(&text, start..end.max(start), needle) else {
        return Some((line, column));
    };
    Some(line_column(&text, hit))
}

/// Where `needle` (a template's text at fault, not escaped as `$$`) first stands in environment
/// `env`'s part of the playbook at `path`, else anywhere before it (top-level `vars:`, `ssh:`): to
/// point an error found as hosts are resolved, or in `url:`, at its line and column.
pub fn locate_in_env(path: &Path, env: &str, needle: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let root: serde_saphyr::Spanned<Node> = serde_saphyr::from_str(&text).ok()?;
    let (node, found) = descend(&root, &[key("environments"), key(env)]);
    let l = node.referenced;
    let start = match found && l.line() > 0 {
        true => offset(&text, l.line(), l.column()),
        false => 0,
    };
    let hit = find_unescaped(&text, start..text.len(), needle)
        .or_else(|| find_unescaped(&text, 0..text.len(), needle))?;
    Some(line_column(&text, hit))
}

/// The byte offset of the first `needle` within `range` of `text` not escaped as `$$`.
fn find_unescaped(text: &str, range: std::ops::Range<usize>, needle: &str) -> Option<usize> {
    let start = range.start;
    text[range]
        .match_indices(needle)
        .map(|(i, _)| start + i)
        .find(|&i| !text[..i].ends_with('$'))
}

/// The 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (u64, u64) {
    let before = &text[..at];
    let line = before.matches('\n').count() as u64 + 1;
    let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
        .chars()
        .count() as u64
        + 1;
    (line, column)
}

/// The byte offset of a 1-based line and column (in characters) in `text`.
fn offset(text: &str, line: u64, column: u64) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line as usize - 1)
        .map(str::len)
        .sum();
    line_start
        + text[line_start..]
            .chars()
            .take(column as usize - 1)
            .map(char::len_utf8)
            .sum::<usize>()
}

/// The node at `path` under `root`, or its deepest ancestor that exists; and whether it is the
/// node itself.
fn descend<'a>(
    root: &'a serde_saphyr::Spanned<Node>,
    path: &[Seg],
) -> (&'a serde_saphyr::Spanned<Node>, bool) {
    let mut node = root;
    for seg in path {
        let child = match (&node.value, seg) {
            (Node::Map(m), Seg::Key(k)) => m.iter().find(|(name, _)| name == k).map(|(_, n)| n),
            (Node::Seq(s), Seg::Index(i)) => s.get(*i),
            _ => None,
        };
        match child {
            Some(c) => node = c,
            None => return (node, false),
        }
    }
    (node, true)
}

/// The line and column of the node at `path` in `text`, or of its deepest ancestor that exists.
fn locate(text: &str, path: &[Seg]) -> Option<(u64, u64)> {
    let root: serde_saphyr::Spanned<Node> = serde_saphyr::from_str(text).ok()?;
    let (node, _) = descend(&root, path);
    let l = node.referenced;
    (l.line() > 0).then(|| (l.line(), l.column()))
}

/// Cross-field checks serde cannot express; each error names the node at fault.
fn validate(pb: &Playbook) -> Result<(), Invalid> {
    let fail = |at: Vec<Seg>, message: String| Err(Invalid { at, message });
    if !is_name(&pb.app) {
        return fail(
            vec![key("app")],
            format!(
                "app `{}`: use letters, digits, `-`, `_` and `.` only",
                pb.app
            ),
        );
    }
    if pb.environments.is_empty() {
        return fail(
            vec![key("environments")],
            "no environments: add `environments:` with at least one".into(),
        );
    }
    for (name, env) in &pb.environments {
        let here = |rest: &[Seg]| [&[key("environments"), key(name)], rest].concat();
        if !is_name(name) {
            return fail(
                here(&[]),
                format!("environment `{name}`: use letters, digits, `-`, `_` and `.` only"),
            );
        }
        if env.hosts.is_empty() {
            return fail(
                here(&[key("hosts")]),
                format!("environment `{name}` has no hosts"),
            );
        }
        // A branch name may hold `/` (`feature/x`): a root per branch would nest, and its state
        // (ledger, locks) would land where `ferry status` does not look.
        if env.root.as_deref().is_some_and(|r| r.contains("${ref}")) {
            return fail(
                here(&[key("root")]),
                format!(
                    "environment `{name}`: root uses `${{ref}}`, which may hold `/`; use `${{ref_slug}}` for a directory per branch"
                ),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, h) in env.hosts.iter().enumerate() {
            // One key, one known_hosts and one connection budget serve a whole run.
            let run_wide = [
                ("key", h.ssh.key.is_some()),
                ("known_hosts", h.ssh.known_hosts.is_some()),
                ("connect_timeout", h.ssh.connect_timeout.is_some()),
                ("forks", h.ssh.forks.is_some()),
            ];
            if let Some((field, _)) = run_wide.iter().find(|(_, set)| *set) {
                return fail(
                    here(&[key("hosts"), Seg::Index(i), key("ssh"), key(field)]),
                    format!(
                        "host `{}`: `ssh.{field}` applies to a whole run; set it under `environments.{name}.ssh` or at the top",
                        h.label()
                    ),
                );
            }
            // (The name keys per-host overrides and `--limit`, so it is used as written.)
            if h.name.as_deref().is_some_and(|n| n.contains("${")) {
                return fail(
                    here(&[key("hosts"), Seg::Index(i), key("name")]),
                    format!(
                        "host name `{}`: a name is used as written (it keys per-host overrides and \
                         --limit), not as a template; write it out",
                        h.label()
                    ),
                );
            }
            if !seen.insert(h.label()) {
                return fail(
                    here(&[key("hosts"), Seg::Index(i)]),
                    format!("environment `{name}` lists host `{}` twice", h.label()),
                );
            }
        }
        for (list, steps) in [("steps", &env.steps), ("on_stop", &env.on_stop)] {
            for (i, step) in steps.iter().enumerate() {
                if let Step::Sync(s) = step {
                    for (j, pat) in s.exclude.iter().enumerate() {
                        if let Err(e) = crate::sync::manifest::excludes(std::slice::from_ref(pat)) {
                            return fail(
                                here(&[
                                    key(list),
                                    Seg::Index(i),
                                    key("sync"),
                                    key("exclude"),
                                    Seg::Index(j),
                                ]),
                                format!("sync to `{}`: {:#}", s.to, e),
                            );
                        }
                    }
                }
                if let Step::Sync(s) = step
                    && s.mode == SyncMode::Release
                    && !s.delete
                {
                    return fail(
                        here(&[key(list), Seg::Index(i), key("sync"), key("delete")]),
                        format!(
                            "sync to `{}`: `delete: false` keeps files on the host that the build does not have, \
                             which only `mode: in-place` does (a release holds the build and nothing else); \
                             add `mode: in-place`, or drop `delete: false`",
                            s.to
                        ),
                    );
                }
                let (Step::Container(c) | Step::Accessory(c)) = step else {
                    continue;
                };
                let body = |rest: &[Seg]| {
                    [&here(&[key(list), Seg::Index(i), key(step.kind())]), rest].concat()
                };
                for host in c.hosts.keys() {
                    let at = body(&[key("hosts"), key(host)]);
                    if !env.hosts.iter().any(|h| h.label() == host) {
                        return fail(
                            at,
                            format!(
                                "container `{}` overrides host `{host}`, which environment `{name}` does not list",
                                c.name
                            ),
                        );
                    }
                    let why = match c.for_host(host) {
                        Err(e) => Some(format!("is invalid: {e}")),
                        Ok(spec) => spec.health.as_ref().and_then(health_problem).map(|p| p.1),
                    };
                    if let Some(why) = why {
                        return fail(
                            at,
                            format!("container `{}`: override for host `{host}` {why}", c.name),
                        );
                    }
                }
                match crate::docker::spec::check_literal(c) {
                    Err(crate::docker::spec::SpecError::BadField { field, why, .. }) => {
                        let at: Vec<Seg> = field.split('.').map(key).collect();
                        return fail(
                            body(&at),
                            format!("container `{}`: `{field}` {why}", c.name),
                        );
                    }
                    Err(e) => return fail(body(&[key("name")]), e.to_string()),
                    Ok(()) => {}
                }
                if let Some((field, why)) = c.health.as_ref().and_then(health_problem) {
                    return fail(
                        body(&[key("health"), key(field)]),
                        format!("container `{}`: {why}", c.name),
                    );
                }
            }
        }
    }
    for (i, rule) in pb.rules.iter().enumerate() {
        let here = |rest: &[Seg]| [&[key("rules"), Seg::Index(i)], rest].concat();
        if rule.branch.is_some() == rule.tag.is_some() {
            return fail(
                here(&[]),
                "a rule needs exactly one of `branch:` or `tag:`".into(),
            );
        }
        for (j, e) in rule.deploy.iter().enumerate() {
            if rule.deploy[..j].contains(e) {
                return fail(
                    here(&[key("deploy"), Seg::Index(j)]),
                    format!("rule deploys to `{e}` twice (it would run twice)"),
                );
            }
            if !pb.environments.contains_key(e) {
                return fail(
                    here(&[key("deploy"), Seg::Index(j)]),
                    format!(
                        "rule deploys to `{e}`, which is not under `environments:` (have: {})",
                        pb.environments
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
    }
    Ok(())
}

/// What is wrong with a health check, if anything: the field at fault and why. (Also checked on
/// each host's resolved spec, `docker::spec`.)
pub fn health_problem(h: &HealthCheck) -> Option<(&'static str, String)> {
    let missing = match h.kind {
        HealthKind::Http if h.url.is_none() => Some("url"),
        HealthKind::Tcp if h.address.is_none() => Some("address"),
        _ => None,
    };
    if let Some(field) = missing {
        return Some((
            field,
            format!("health check type {:?} needs `{field}`", h.kind),
        ));
    }
    if let Some((field, _)) = [("timeout", h.timeout), ("interval", h.interval())]
        .into_iter()
        .find(|(_, d)| d.is_zero())
    {
        return Some((field, format!("health `{field}` must be more than 0s")));
    }
    (h.interval() > h.timeout).then(|| {
        (
            "interval",
            format!(
                "health `interval` ({:?}) is longer than its `timeout` ({:?}): its second try \
                 would come after the timeout; shorten the interval or lengthen the timeout",
                h.interval(),
                h.timeout
            ),
        )
    })
}

/// Names that go into paths and container names unquoted must be plain.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Auto => write!(f, "auto"),
            KeySource::Env => write!(f, "env"),
            KeySource::Agent => write!(f, "agent"),
            KeySource::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl Playbook {
    pub fn environment(&self, name: &str) -> Result<&Environment, String> {
        self.environments.get(name).ok_or_else(|| {
            format!(
                "no environment `{name}` in {} (have: {})",
                self.path.display(),
                self.environments
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Playbook, PlaybookError> {
        parse(text, Path::new("pb.yml"))
    }

    const MINIMAL: &str =
        "app: shop\nenvironments:\n  staging:\n    hosts: [deploy@10.0.0.5:2222]\n";

    #[test]
    fn minimal_playbook_parses_host_shorthand() {
        let pb = p(MINIMAL).unwrap();
        let h = &pb.environments["staging"].hosts[0];
        assert_eq!(h.address, "deploy@10.0.0.5:2222");
        assert_eq!(h.label(), "deploy@10.0.0.5:2222");
        assert!(p("app: shop\nenvironments:\n  s:\n    hosts: ['a@b:99999']\n").is_err());
    }

    #[test]
    fn unknown_key_reports_line_and_column() {
        let err = p("app: shop\nenvironments:\n  staging:\n    hosts: [a]\n    hostz: [b]\n")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("pb.yml:5:5: "), "{msg}");
        assert!(msg.contains("hostz"), "{msg}");
    }

    #[test]
    fn a_container_value_docker_would_refuse_is_located_where_it_stands() {
        let text = "app: shop\nenvironments:\n  staging:\n    hosts: [a]\n    steps:\n      - container:\n          name: app\n          image: shop:1\n          restart: sometimes\n";
        let msg = p(text).unwrap_err().to_string();
        assert!(
            msg.starts_with("pb.yml:9:20: container `app`: `restart` `sometimes` is not no"),
            "{msg}"
        );
        let msg = p(&text.replace("restart: sometimes", "memory: lots"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("pb.yml:9:19: container `app`: `memory`"),
            "{msg}"
        );
        // A template is checked once expanded, on the host's run.
        p(&text.replace("restart: sometimes", "restart: \"${env.RESTART:-always}\"")).unwrap();
    }

    #[test]
    fn a_bad_exclude_pattern_is_located_where_it_stands() {
        let text = "app: shop\nenvironments:\n  staging:\n    hosts: [a]\n    steps:\n      - sync: { from: dist, to: /srv/w, exclude: ['*.map', '[z-a]'] }\n";
        let msg = p(text).unwrap_err().to_string();
        assert!(
            msg.starts_with("pb.yml:6:60: sync to `/srv/w`: bad exclude pattern `[z-a]`"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_key_or_value_of_a_host_map_is_located_where_it_stands() {
        let text = "app: shop\nenvironments:\n  staging:\n    hosts:\n      - deploy@web1\n      - host: deploy@web2\n        prot: 2222\n      - { host: web3, usr: x }\n";
        let msg = p(text).unwrap_err().to_string();
        assert!(msg.starts_with("pb.yml:7:9: unknown field `prot`"), "{msg}");
        let msg = p(&text.replace("prot: 2222", "port: abc"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("pb.yml:7:15: expected a whole number from 0 to 65535"),
            "a bad value too: {msg}"
        );
        let text = text.replace("prot: 2222", "port: 2222");
        let msg = p(&text).unwrap_err().to_string();
        assert!(msg.starts_with("pb.yml:8:23: unknown field `usr`"), "{msg}");
    }

    #[test]
    fn library_messages_are_put_in_our_words() {
        let msg = p("app: a\napp: b\nenvironments: {e: {hosts: [h]}}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "pb.yml:2:1: `app` is set twice in this mapping; keep one"
        );
        let msg = p("app: a\nenvironments: {e: {hosts: h}}\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(":2:27: expected a list"), "{msg}");
        let msg = p("app: a\nenvironments: {e: {hosts: [h], steps: [{sync: {from: d, to: w, keep: -1}}]}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.ends_with(": expected a whole number (0 or more)"),
            "{msg}"
        );
    }

    #[test]
    fn delete_false_is_for_in_place_mode_only() {
        let text = "app: shop\nenvironments:\n  e:\n    hosts: [h1]\n    steps:\n      - sync: { from: dist/, to: www, delete: false }\n";
        let msg = p(text).unwrap_err().to_string();
        assert!(msg.starts_with("pb.yml:6:"), "{msg}");
        assert!(msg.contains("only `mode: in-place`"), "{msg}");
        p(&text.replace("delete: false", "delete: false, mode: in-place")).unwrap();
    }

    #[test]
    fn bad_yaml_reports_location() {
        let err = p("app: shop\nenvironments: [\n").unwrap_err();
        assert!(
            matches!(err, PlaybookError::Syntax { line: 2.., .. }),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_say_where_once_and_what_was_expected() {
        let err = p("app: a\n  bad: [\n").unwrap_err().to_string();
        assert!(
            err.starts_with("pb.yml:2:") && !err.contains("column"),
            "{err}"
        );
        let rules = "app: a\nenvironments:\n  e:\n    hosts: [h1]\nrules:\n  - branch: main\n    deploy: {a: 1}\n";
        let err = p(rules).unwrap_err().to_string();
        assert!(
            err.starts_with("pb.yml:7:13: expected a name or a list of names"),
            "{err}"
        );
    }

    #[test]
    fn steps_are_one_key_maps() {
        let pb = p(&format!(
            "{MINIMAL}    steps:\n      - sync: {{ from: dist/, to: /srv/web/app, keep: 3 }}\n      - run: {{ command: [echo, hi] }}\n"
        ))
        .unwrap();
        let steps = &pb.environments["staging"].steps;
        assert!(matches!(&steps[0], Step::Sync(s)
            if s.keep == 3 && s.mode == SyncMode::Release && s.compress == Compress::Auto));
        assert!(
            matches!(&steps[1], Step::Run(r) if r.command == Command::Argv(vec!["echo".into(), "hi".into()]))
        );
    }

    #[test]
    fn sync_compress_takes_auto_or_all() {
        let step = |v: &str| {
            p(&format!(
                "{MINIMAL}    steps:\n      - sync: {{ from: d, to: t, compress: {v} }}\n"
            ))
        };
        let pb = step("all").unwrap();
        let steps = &pb.environments["staging"].steps;
        assert!(matches!(&steps[0], Step::Sync(s) if s.compress == Compress::All));
        let err = step("fast").unwrap_err().to_string();
        assert!(
            err.starts_with("pb.yml:6:") && err.contains("fast"),
            "{err}"
        );
    }

    #[test]
    fn unknown_step_is_an_error_with_location() {
        let err = p(&format!(
            "{MINIMAL}    steps:\n      - rsync: {{ from: a }}\n"
        ))
        .unwrap_err();
        assert!(err.to_string().starts_with("pb.yml:6:"), "{err}");
    }

    #[test]
    fn a_short_timeout_shortens_the_default_interval() {
        let pb = p(&format!(
            "{MINIMAL}    steps:\n      - container:\n          name: c\n          image: i\n          health: {{ type: tcp, address: 'a:1', timeout: 500ms }}\n"
        ))
        .unwrap();
        let Step::Container(c) = &pb.environments["staging"].steps[0] else {
            panic!("a container step")
        };
        let h = c.health.as_ref().unwrap();
        assert_eq!(h.interval(), Duration::from_millis(500));
    }

    #[test]
    fn text_is_located_inside_the_step() {
        let dir = std::env::temp_dir().join(format!("ferry-locate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pb.yml");
        // `${x}` stands in several steps; the one asked about is found (columns in chars), not
        // an escaped `$${x}`.
        std::fs::write(
            &path,
            "app: a\nenvironments:\n  a:\n    steps:\n      - run: \"é ${x}\"\n      - run: \"$${x} ${x}\"\n  b:\n    steps:\n      - run: \"é ${x}\"\n",
        )
        .unwrap();
        let at = |env: &str, i: usize, needle: &str| locate_in_step(&path, env, "steps", i, needle);
        assert_eq!(at("a", 0, "${x}"), Some((5, 17)));
        assert_eq!(at("a", 1, "${x}"), Some((6, 21)));
        assert_eq!(at("b", 0, "${x}"), Some((9, 17)));
        // Not found as written: the step itself; no such step: nothing.
        assert_eq!(at("b", 0, "${y}"), Some((9, 9)));
        assert_eq!(at("b", 1, "${x}"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rule_must_name_known_environment() {
        let err = p(&format!(
            "{MINIMAL}rules:\n  - branch: release-*\n    deploy: prod\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("`prod`"), "{err}");
        assert!(
            err.to_string().starts_with("pb.yml:7:13: rule deploys"),
            "{err}"
        );
    }

    #[test]
    fn container_overrides_are_checked_at_load() {
        let pb = |over: &str| {
            format!(
                "app: a\nenvironments:\n  e:\n    hosts: [h1]\n    steps:\n      - container:\n          name: web\n          image: i\n          hosts:\n            h1: {over}\n"
            )
        };
        let err = p(&pb("{ portz: ['80:80'] }")).unwrap_err().to_string();
        assert!(
            err.starts_with("pb.yml:10:17: container `web`: override for host `h1` is invalid")
                && err.contains("portz"),
            "{err}"
        );
        assert!(p(&pb("{ ports: ['80:80'] }")).is_ok());
        let err = p(&pb("{ hosts: {} }")).unwrap_err().to_string();
        assert!(err.contains("cannot be overridden per host"), "{err}");
    }

    #[test]
    fn run_wide_ssh_settings_are_refused_on_a_host() {
        let pb = "app: a\nenvironments:\n  e:\n    hosts:\n      - host: h1\n        ssh: { key: agent }\n";
        let err = p(pb).unwrap_err().to_string();
        assert!(
            err.contains("host `h1`: `ssh.key` applies to a whole run"),
            "{err}"
        );
        assert!(err.starts_with("pb.yml:6:21: "), "{err}");
        let ok = "app: a\nenvironments:\n  e:\n    hosts:\n      - host: h1\n        ssh: { user: u, port: 2 }\n";
        assert!(p(ok).is_ok());
    }

    #[test]
    fn cross_field_errors_point_at_the_node_at_fault() {
        // Each error names the node it is about, not the first line that mentions the same key.
        let rules = |r: &str| format!("{MINIMAL}rules:\n{r}");
        let cases = [
            (
                "app: a\nenvironments:\n  e:\n    hosts: [h1, h2]\n    steps:\n      - container:\n          name: one\n          image: i\n          health: { type: http, url: 'http://x/' }\n      - container:\n          name: two\n          image: i\n          health:\n            type: http\n".to_string(),
                "pb.yml:14:13: container `two`: health check type Http needs `url`",
            ),
            (
                "app: a\nenvironments:\n  e:\n    hosts:\n      - h1\n      - h2\n      - h1\n".into(),
                "pb.yml:7:9: environment `e` lists host `h1` twice",
            ),
            (
                "app: a\nenvironments:\n  h9:\n    hosts: [h1]\n    on_stop:\n      - accessory:\n          name: db\n          image: i\n          hosts:\n            h9: { image: j }\n".into(),
                "pb.yml:10:17: container `db` overrides host `h9`",
            ),
            (
                rules("  - branch: main\n    deploy: staging\n  - deploy: [staging]\n"),
                "pb.yml:8:5: a rule needs exactly one of `branch:` or `tag:`",
            ),
            (
                rules("  - tag: 'v*'\n    deploy: [staging, prod]\n"),
                "pb.yml:7:23: rule deploys to `prod`",
            ),
            (
                rules("  - tag: 'v*'\n    deploy: [staging, staging]\n"),
                "pb.yml:7:23: rule deploys to `staging` twice",
            ),
            (
                "app: a\nenvironments:\n  e:\n    hosts: []\n".into(),
                "pb.yml:4:12: environment `e` has no hosts",
            ),
            (
                "app: a\nenvironments:\n  e:\n    hosts: [h1]\n    root: /srv/review/${ref}\n".into(),
                "pb.yml:5:11: environment `e`: root uses `${ref}`",
            ),
            (
                "app: a\nenvironments:\n  e:\n    hosts: [h1]\n    steps:\n      - container:\n          name: c\n          image: i\n          health: { type: docker, timeout: 0s }\n".into(),
                "pb.yml:9:44: container `c`: health `timeout` must be more than 0s",
            ),
            (
                "app: a\nenvironments:\n  e:\n    hosts: [h1]\n    steps:\n      - container:\n          name: c\n          image: i\n          health:\n            type: docker\n            interval: 0s\n".into(),
                "pb.yml:11:23: container `c`: health `interval` must be more than 0s",
            ),
            (
                "app: a\nenvironments:\n  e:\n    hosts: [h1]\n    steps:\n      - container:\n          name: c\n          image: i\n          health:\n            type: docker\n            timeout: 2s\n            interval: 5s\n".into(),
                "pb.yml:12:23: container `c`: health `interval` (5s) is longer than its `timeout` (2s)",
            ),
            (
                "app: a\nenvironments:\n  e:\n    hosts: [h1]\n    steps:\n      - container:\n          name: c\n          image: i\n          health: { type: docker }\n          hosts:\n            h1: { health: { type: docker, timeout: 0s } }\n".into(),
                "pb.yml:11:17: container `c`: override for host `h1` health `timeout` must be more than 0s",
            ),
        ];
        for (text, want) in cases {
            let err = p(&text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("[::1]:22").unwrap(),
            Address {
                user: None,
                host: "::1".into(),
                port: Some(22)
            }
        );
        assert!(parse_address("a@b:0").is_err());
        assert!(parse_address("a@b:x").is_err());
        assert!(parse_address("@b").is_err());
    }

    #[test]
    fn a_byte_not_utf8_is_located() {
        let path = std::env::temp_dir().join(format!("ferry-utf8-{}.yml", std::process::id()));
        std::fs::write(&path, b"app: a\n# caf\xe9\nenvironments: {}\n").unwrap();
        let e = load(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.ends_with(".yml:2:6: a byte that is not UTF-8: save the playbook as UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("12").unwrap(), Duration::from_secs(12));
        assert!(parse_duration("5x").is_err());
        // Too long to mean anything, or to add to a clock without overflowing: refused.
        for long in [
            "18446744073709551615s1s",
            "213503982334602d",
            "3651d",
            "315360001",
        ] {
            let e = parse_duration(long).unwrap_err();
            assert!(e.contains("longer than ferry waits"), "{long}: {e}");
        }
        assert_eq!(parse_duration("3650d").unwrap(), MAX_DURATION);
    }

    #[test]
    fn key_source_values() {
        let pb = p(&format!(
            "{MINIMAL}ssh:\n  key: file:/k\n  known_hosts: env\n  connect_timeout: 5s\n"
        ))
        .unwrap();
        assert_eq!(pb.ssh.key, Some(KeySource::File("/k".into())));
        assert_eq!(pb.ssh.known_hosts, Some(KnownHostsSource::Env));
        assert_eq!(pb.ssh.connect_timeout, Some(Duration::from_secs(5)));
        let err = p(&format!("{MINIMAL}ssh:\n  key: vault\n")).unwrap_err();
        assert!(err.to_string().contains("pb.yml:6:"), "{err}");
    }
}
