//! Inventory: turns an environment of the playbook into concrete hosts to connect to, with SSH
//! settings layered (defaults < playbook < environment < host < command line) and templates expanded.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::playbook::{
    self, DockerSettings, Environment, KeySource, KnownHostsSource, Playbook, SshSettings,
};
use crate::ssh::Target;
use crate::template::{self, Vars};

pub const DEFAULT_FORKS: usize = 10;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One host of an environment, ready to connect to and deploy on.
#[derive(Debug, Clone)]
pub struct Host {
    pub target: Target,
    /// `docker` argv on this host (e.g. `["sudo", "docker"]`).
    pub docker: Vec<String>,
    /// Template variables: deploy context < playbook < environment < host, plus `host`, `env`, `app`.
    pub vars: Vars,
    /// The environment's root directory on this host (templates expanded).
    pub root: String,
    /// The part of `root` that does not depend on the ref (see [`state_base`]).
    pub state_base: String,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.target.name
    }

    /// Expand a template with this host's variables.
    pub fn expand(&self, s: &str) -> anyhow::Result<String> {
        self.template(s).with_context(|| self.name().to_string())
    }

    /// [`Host::expand`] for a command line a shell reads (see [`template::expand_shell`]).
    pub fn expand_shell(&self, s: &str) -> anyhow::Result<String> {
        template::expand_shell(s, &self.vars).with_context(|| self.name().to_string())
    }

    /// [`Host::expand`], with the template's own error.
    pub fn template(&self, s: &str) -> Result<String, template::TemplateError> {
        template::expand(s, &self.vars)
    }

    /// A remote path: absolute as given, or relative to the environment's root.
    pub fn path(&self, s: &str) -> anyhow::Result<String> {
        let p = self.expand(s)?;
        Ok(if p.starts_with('/') {
            p
        } else {
            format!("{}/{}", self.root.trim_end_matches('/'), p)
        })
    }

    /// Where ferry keeps its state on the host (locks, ledger): `.ferry` under the part of the root
    /// that does not depend on the ref, so that every branch of a review environment shares it and
    /// `ferry status` finds it without knowing the ref.
    pub fn state_dir(&self) -> String {
        format!("{}/.ferry", self.state_base.trim_end_matches('/'))
    }
}

/// Command-line overrides of the playbook's SSH settings.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub forks: Option<usize>,
    pub connect_timeout: Option<Duration>,
    /// Only these hosts (by name), if not empty.
    pub limit: Vec<String>,
}

/// The resolved SSH settings of a run (the environment level; hosts may override user/port/jump).
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub key: KeySource,
    pub known_hosts: KnownHostsSource,
    pub connect_timeout: Duration,
    pub forks: usize,
}

/// Resolve `env_name` of `pb` into hosts, with `base_vars` (the deploy context's) underneath.
/// Whether `--limit` (empty: no limit) keeps a host, by its name or its address's host part.
fn limited_to(limit: &[String], name: &str, host: &str) -> bool {
    limit.is_empty() || limit.iter().any(|l| l == name || l == host)
}

/// Whether `--limit` keeps any host of environment `env_name`, for commands over every
/// environment (those it keeps none of are left out). An environment whose hosts cannot be read
/// here counts as kept: resolving it says why.
pub fn any_selected(pb: &Playbook, env_name: &str, base_vars: &Vars, limit: &[String]) -> bool {
    let Ok(env) = pb.environment(env_name) else {
        return true;
    };
    env.hosts.iter().any(|entry| {
        let Ok(spec) = template::expand(&entry.address, base_vars) else {
            return true;
        };
        let Ok(address) = playbook::parse_address(&spec) else {
            return true;
        };
        let name = entry.name.clone().unwrap_or_else(|| spec.clone());
        limited_to(limit, &name, &address.host)
    })
}

pub fn resolve(
    pb: &Playbook,
    env_name: &str,
    base_vars: &Vars,
    ov: &Overrides,
) -> anyhow::Result<(RunSettings, Vec<Host>)> {
    let env = pb.environment(env_name).map_err(anyhow::Error::msg)?;
    let env_ssh = env.ssh.merged(&pb.ssh);
    let settings = RunSettings {
        key: env_ssh.key.clone().unwrap_or(KeySource::Auto),
        known_hosts: match &ov.known_hosts {
            Some(p) => KnownHostsSource::File(p.clone()),
            None => env_ssh
                .known_hosts
                .clone()
                .unwrap_or(KnownHostsSource::Auto),
        },
        connect_timeout: ov
            .connect_timeout
            .or(env_ssh.connect_timeout)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        forks: ov.forks.or(env_ssh.forks).unwrap_or(DEFAULT_FORKS).max(1),
    };
    let mut hosts = Vec::new();
    for entry in &env.hosts {
        let spec = template::expand(&entry.address, base_vars)
            .with_context(|| format!("environment `{env_name}`: host `{}`", entry.address))?;
        let address = playbook::parse_address(&spec)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("environment `{env_name}`: host `{}`", entry.address))?;
        let name = entry.name.clone().unwrap_or_else(|| spec.clone());
        if !limited_to(&ov.limit, &name, &address.host) {
            continue;
        }
        let ssh = entry.ssh.merged(&env_ssh);
        // Later layers win; each value may use the layers below it and `${env.NAME}`.
        // (`app`, `env` and `host` are there for every layer, and no layer may set them.)
        let fixed = [
            ("app", &pb.app),
            ("env", &env_name.to_string()),
            ("host", &name),
        ]
        .map(|(k, v)| (k.to_string(), v.clone()));
        let layered = |base: &Vars| -> anyhow::Result<Vars> {
            let mut vars = base.clone();
            vars.extend(fixed.clone());
            for layer in [&pb.vars, &env.vars, &entry.vars] {
                if let Some(k) = layer.keys().find(|k| fixed.iter().any(|(f, _)| f == *k)) {
                    bail!("variable `{k}` is set by ferry; give yours another name");
                }
                expand_layer(layer, &mut vars)?;
            }
            Ok(vars)
        };
        let mut vars = layered(base_vars)?;
        let ssh_user = match &ssh.user {
            Some(u) => Some(template::expand(u, &vars).context("ssh.user")?),
            None => None,
        };
        let user = match (&entry.user, address.user) {
            (Some(u), _) => template::expand(u, &vars)
                .with_context(|| format!("environment `{env_name}`: host `{name}`: user"))?,
            (None, Some(u)) => u,
            (None, None) => ssh_user.clone().unwrap_or_else(default_user),
        };
        let target = Target {
            name: name.clone(),
            user,
            host: address.host,
            port: entry.port.or(address.port).or(ssh.port).unwrap_or(22),
            jump: jump_target(&ssh, ssh_user, &vars)?,
        };
        let root_t = env
            .root
            .clone()
            .unwrap_or_else(|| format!("/srv/{}", pb.app));
        let root = template::expand(&root_t, &vars)
            .with_context(|| format!("environment `{env_name}`: root"))?;
        if !root.starts_with('/') {
            bail!("environment `{env_name}`: root `{root}` must be an absolute path");
        }
        // The same root for another ref: what differs depends on the ref.
        let other_root = template::expand(&root_t, &layered(&other_ref(base_vars))?)
            .with_context(|| format!("environment `{env_name}`: root"))?;
        vars.insert("root".into(), root.clone());
        hosts.push(Host {
            target,
            docker: docker_argv(&entry.docker, env),
            vars,
            state_base: state_base(&root, &other_root),
            root,
        });
    }
    if hosts.is_empty() {
        bail!("no hosts selected in environment `{env_name}` (check --limit)");
    }
    Ok((settings, hosts))
}

/// Variables that change with the ref being deployed.
const REF_VARS: [&str; 7] = [
    "ref",
    "ref_slug",
    "tag",
    "sha",
    "short_sha",
    "pipeline_id",
    "user",
];

/// `base` with every ref-dependent variable set to a value no ref produces.
fn other_ref(base: &Vars) -> Vars {
    let mut v = base.clone();
    for k in REF_VARS {
        if let Some(x) = v.get_mut(k) {
            x.push_str("\u{1}other");
        }
    }
    v
}

/// The leading path components two expansions of the root (for two different refs) share: the
/// ref-independent base under which ferry keeps state. `/srv/shop` for `/srv/shop`, `/srv/review`
/// for `/srv/review/${ref_slug}`.
pub fn state_base(root: &str, other: &str) -> String {
    let common: Vec<&str> = root
        .split('/')
        .zip(other.split('/'))
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    let joined = common.join("/");
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

fn docker_argv(host: &DockerSettings, env: &Environment) -> Vec<String> {
    host.merged(&env.docker).argv()
}

/// The bastion of `ssh.proxy_jump`, expanded with the host's `vars`; its user defaults to `user`
/// (the expanded `ssh.user`).
fn jump_target(
    ssh: &SshSettings,
    user: Option<String>,
    vars: &Vars,
) -> anyhow::Result<Option<Box<Target>>> {
    let Some(spec) = &ssh.proxy_jump else {
        return Ok(None);
    };
    let spec = &template::expand(spec, vars).context("proxy_jump")?;
    let a = playbook::parse_address(spec)
        .map_err(anyhow::Error::msg)
        .context("proxy_jump")?;
    Ok(Some(Box::new(Target {
        name: spec.clone(),
        user: a.user.or(user).unwrap_or_else(default_user),
        host: a.host,
        port: a.port.unwrap_or(22),
        jump: None,
    })))
}

fn default_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

/// Expand one layer of `vars` into `vars`. A value may use the layers below and the other values
/// of its own layer, whatever their order (each waits for those it names; its own name is the
/// layer below's value); values that name each other in a circle are an error.
fn expand_layer(
    layer: &std::collections::BTreeMap<String, String>,
    vars: &mut Vars,
) -> anyhow::Result<()> {
    let mut pending: Vec<(&String, &String)> = layer.iter().collect();
    let mut done = std::collections::HashSet::new();
    while !pending.is_empty() {
        let before = pending.len();
        let mut waiting = Vec::new();
        for (k, v) in pending {
            let mut known = vars.clone();
            known.retain(|w, _| w == k || done.contains(w) || !layer.contains_key(w));
            match template::expand(v, &known) {
                Ok(value) => {
                    vars.insert(k.clone(), value);
                    done.insert(k.clone());
                }
                Err(template::TemplateError::Unknown { name, .. })
                    if name != *k && layer.contains_key(&name) && !done.contains(&name) =>
                {
                    waiting.push((k, v));
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("variable `{k}`"))),
            }
        }
        if waiting.len() == before {
            let names: Vec<String> = waiting.iter().map(|(k, _)| format!("`{k}`")).collect();
            bail!(
                "variables {} use each other in a circle: one of them must not name the others",
                names.join(", ")
            );
        }
        pending = waiting;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn state_base_drops_ref_dependent_components() {
        assert_eq!(state_base("/srv/shop", "/srv/shop"), "/srv/shop");
        assert_eq!(state_base("/srv/review/a", "/srv/review/b"), "/srv/review");
        assert_eq!(state_base("/srv/x-a/y", "/srv/x-b/y"), "/srv");
        assert_eq!(state_base("/a", "/b"), "/");
    }

    #[test]
    fn layering_and_templates() {
        let pb = playbook::parse(
            "app: shop\nssh: { user: deploy, port: 2200 }\nvars: { site: a, dir: '/srv/${app}/${env}/${host}' }\nenvironments:\n  review:\n    root: /srv/review/${ref_slug}\n    ssh: { proxy_jump: 'jump@bastion:2022' }\n    hosts:\n      - web1\n      - { host: web2, user: root, port: 22, vars: { site: b } }\n",
            Path::new("pb.yml"),
        )
        .unwrap();
        let base: Vars = [("ref_slug".to_string(), "feature-x".to_string())].into();
        let (settings, hosts) = resolve(&pb, "review", &base, &Overrides::default()).unwrap();
        assert_eq!(settings.forks, DEFAULT_FORKS);
        assert_eq!(hosts[0].target.user, "deploy");
        assert_eq!(hosts[0].target.port, 2200);
        assert_eq!(hosts[0].root, "/srv/review/feature-x");
        assert_eq!(hosts[0].state_dir(), "/srv/review/.ferry");
        assert_eq!(
            hosts[0].path("current").unwrap(),
            "/srv/review/feature-x/current"
        );
        assert_eq!(hosts[1].target.user, "root");
        assert_eq!(hosts[1].vars["site"], "b");
        // Variables may use `app`, `env` and `host`, and may not set them.
        assert_eq!(hosts[1].vars["dir"], "/srv/shop/review/web2");
        let mut pb = pb;
        pb.vars.insert("host".into(), "x".into());
        let e = resolve(&pb, "review", &base, &Overrides::default()).unwrap_err();
        assert!(
            format!("{e:#}").contains("variable `host` is set by ferry"),
            "{e:#}"
        );
        let jump = hosts[0].target.jump.as_ref().unwrap();
        assert_eq!(
            (jump.user.as_str(), jump.host.as_str(), jump.port),
            ("jump", "bastion", 2022)
        );
        assert_eq!(hosts[0].docker, vec!["docker"]);
    }

    #[test]
    fn variables_use_each_other_in_any_order() {
        let pb = playbook::parse(
            "app: shop\nvars: { zone: eu, app_dir: '/srv/${zone}/${b}', b: '${a}x', a: '1' }\nenvironments:\n  prod:\n    vars: { zone: us, dir: '${zone}-${app_dir}' }\n    hosts: [web1]\n  loop:\n    vars: { p: '${q}', q: '${p}' }\n    hosts: [web1]\n  self:\n    vars: { zone: '${zone}-2', z: '${zone}' }\n    hosts: [web1]\n",
            Path::new("pb.yml"),
        )
        .unwrap();
        let (_, hosts) = resolve(&pb, "prod", &Vars::new(), &Overrides::default()).unwrap();
        let v = &hosts[0].vars;
        assert_eq!(v["app_dir"], "/srv/eu/1x");
        // A layer's values use its own names first; its own name is the layer below's.
        assert_eq!(v["dir"], "us-/srv/eu/1x");
        let (_, hosts) = resolve(&pb, "self", &Vars::new(), &Overrides::default()).unwrap();
        assert_eq!(
            (&hosts[0].vars["zone"][..], &hosts[0].vars["z"][..]),
            ("eu-2", "eu-2")
        );
        let e = resolve(&pb, "loop", &Vars::new(), &Overrides::default()).unwrap_err();
        assert!(
            format!("{e:#}").contains("`p`, `q` use each other in a circle"),
            "{e:#}"
        );
    }

    #[test]
    fn ssh_user_and_bastion_are_templates() {
        let pb = playbook::parse(
            "app: shop\nvars: { who: deployer, gate: bastion.example.com }\nssh: { user: '${who}', proxy_jump: '${gate}:2022' }\nenvironments:\n  prod:\n    hosts:\n      - web1\n      - { host: web2, user: '${who}-2', vars: { who: ops } }\n",
            Path::new("pb.yml"),
        )
        .unwrap();
        let (_, hosts) = resolve(&pb, "prod", &Vars::new(), &Overrides::default()).unwrap();
        assert_eq!(hosts[0].target.user, "deployer");
        assert_eq!(hosts[1].target.user, "ops-2");
        let jump = hosts[1].target.jump.as_ref().unwrap();
        assert_eq!(
            (jump.user.as_str(), jump.host.as_str(), jump.port),
            ("ops", "bastion.example.com", 2022)
        );
        let named = playbook::parse(
            "app: shop\nenvironments:\n  prod:\n    hosts:\n      - { host: web1, name: 'web-${env}' }\n",
            Path::new("pb.yml"),
        );
        let e = format!("{:#}", named.expect_err("refused"));
        assert!(
            e.contains("pb.yml:5:") && e.contains("used as written"),
            "{e}"
        );
    }
}
