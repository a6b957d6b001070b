//! The pure part of containers: a playbook [`ContainerSpec`] plus a host's overrides and templates
//! becomes a resolved spec, the `docker create` argv that runs it, and a hash that says whether a
//! running container still matches. No IO here, so all of it is tested with data.

use std::collections::BTreeMap;

use crate::playbook::{ContainerSpec, HealthCheck};

/// Suffix of the stopped container kept for rollback after a successful update.
pub const PREV_SUFFIX: &str = ".ferry-prev";
/// Suffix of the old container while its replacement is being health-checked.
pub const ASIDE_SUFFIX: &str = ".ferry-aside";
/// Suffix of the container kept for rollback before this run's update, until the run succeeds.
pub const OLDER_SUFFIX: &str = ".ferry-older";

/// Errors in a spec, found before anything runs on the host.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container `{name}`: override for host `{host}` is invalid: {error}")]
    Override {
        name: String,
        host: String,
        error: String,
    },
    #[error("container `{name}`: {error}")]
    Template {
        name: String,
        error: crate::template::TemplateError,
    },
    #[error(
        "container `{name}`: secret_env {var} reads environment variable {env_var}, {why}; set it in the CI/CD variables"
    )]
    MissingSecret {
        name: String,
        var: String,
        env_var: String,
        /// Unset, or not UTF-8 text (see `ci::secret_var`).
        why: String,
    },
    #[error(
        "container `{name}`: secret_env {var} (from {env_var}) contains a line break (a newline or carriage return), which an env file cannot carry"
    )]
    SecretNewline {
        name: String,
        var: String,
        env_var: String,
    },
    #[error(
        "container name `{name}`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit"
    )]
    BadName { name: String },
    #[error("container `{name}`: {why}")]
    HealthField { name: String, why: String },
    #[error("container `{name}`: `{field}` {why}")]
    BadField {
        name: String,
        field: &'static str,
        why: String,
    },
}

/// A spec for one host: overrides applied, templates expanded, secrets read.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub spec: ContainerSpec,
    /// Container variable name to its secret value (sent on stdin into an env file).
    pub secrets: BTreeMap<String, String>,
}

/// Apply `host`'s overrides from `spec.hosts` (the fields given replace the base spec's).
pub fn with_overrides(spec: &ContainerSpec, host: &str) -> Result<ContainerSpec, SpecError> {
    spec.for_host(host).map_err(|error| SpecError::Override {
        name: spec.name.clone(),
        host: host.to_string(),
        error,
    })
}

/// Overrides, then `expand` over every templated field, then secrets from `env` (the controller's
/// environment). `expand` is the host's template expansion.
pub fn resolve(
    spec: &ContainerSpec,
    host: &str,
    expand: &dyn Fn(&str) -> Result<String, crate::template::TemplateError>,
    env: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Resolved, SpecError> {
    let mut s = with_overrides(spec, host)?;
    let name_for_err = s.name.clone();
    let terr = |error| SpecError::Template {
        name: name_for_err.clone(),
        error,
    };
    let x = |v: &str| expand(v).map_err(terr);
    let xo = |v: &Option<String>| v.as_deref().map(x).transpose();
    let xv = |v: &[String]| v.iter().map(|a| x(a)).collect::<Result<Vec<_>, _>>();
    let xm = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| Ok((k.clone(), x(v)?)))
            .collect::<Result<BTreeMap<_, _>, SpecError>>()
    };
    s.name = x(&s.name)?;
    s.image = x(&s.image)?;
    s.command = s.command.as_deref().map(xv).transpose()?;
    s.entrypoint = s.entrypoint.as_deref().map(xv).transpose()?;
    s.ports = xv(&s.ports)?;
    s.env = xm(&s.env)?;
    s.env_file = xo(&s.env_file)?;
    s.volumes = xv(&s.volumes)?;
    s.network = xo(&s.network)?;
    s.restart = xo(&s.restart)?;
    s.log_driver = xo(&s.log_driver)?;
    s.log_opts = xm(&s.log_opts)?;
    s.labels = xm(&s.labels)?;
    s.user = xo(&s.user)?;
    s.workdir = xo(&s.workdir)?;
    s.extra_hosts = xv(&s.extra_hosts)?;
    s.memory = xo(&s.memory)?;
    s.cpus = xo(&s.cpus)?;
    if let Some(h) = &mut s.health {
        h.url = xo(&h.url)?;
        h.address = xo(&h.address)?;
    }
    check_name(&s.name)?;
    check_health(&s.name, s.health.as_ref())?;
    check_values(&s)?;
    let mut secrets = BTreeMap::new();
    for (var, env_var) in &s.secret_env {
        let value = env(env_var).map_err(|why| SpecError::MissingSecret {
            name: s.name.clone(),
            var: var.clone(),
            env_var: env_var.clone(),
            why,
        })?;
        if value.contains('\n') || value.contains('\r') {
            return Err(SpecError::SecretNewline {
                name: s.name.clone(),
                var: var.clone(),
                env_var: env_var.clone(),
            });
        }
        secrets.insert(var.clone(), value);
    }
    Ok(Resolved { spec: s, secrets })
}

fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    // (Names with ferry's suffixes are the ones it keeps old containers under.)
    let ours = [PREV_SUFFIX, ASIDE_SUFFIX, OLDER_SUFFIX]
        .iter()
        .any(|x| name.contains(x));
    if ok && !ours {
        Ok(())
    } else {
        Err(SpecError::BadName { name: name.into() })
    }
}

/// The values of `spec` that hold no template, checked as [`resolve`] checks them once expanded:
/// for the playbook's reader, which can point at the field at fault.
pub fn check_literal(spec: &ContainerSpec) -> Result<(), SpecError> {
    let plain = |v: &Option<String>| v.clone().filter(|v| !v.contains("${"));
    let mut s = spec.clone();
    if s.name.contains("${") {
        s.name = "x".into();
    }
    if s.image.contains("${") {
        s.image = "x".into();
    }
    s.ports.retain(|p| !p.contains("${"));
    s.restart = plain(&s.restart);
    s.memory = plain(&s.memory);
    s.cpus = plain(&s.cpus);
    if let Some(h) = &mut s.health {
        h.url = plain(&h.url);
    }
    check_name(&s.name)?;
    check_values(&s)
}

/// The values docker would refuse, or take for something else, refused before any host is
/// touched: a replace that fails at `docker create` has already stopped the live container.
fn check_values(s: &ContainerSpec) -> Result<(), SpecError> {
    let bad = |field, why: String| {
        Err(SpecError::BadField {
            name: s.name.clone(),
            field,
            why,
        })
    };
    if let Some(why) = reference_problem(&s.image) {
        return bad(
            "image",
            format!("`{}` is not an image reference: {why}", s.image),
        );
    }
    if let Some(p) = s.ports.iter().find(|p| !port_mapping(p)) {
        return bad(
            "ports",
            format!(
                "`{p}` is not `[IP:]HOST_PORT:PORT[/tcp|udp|sctp]` (ports 1-65535, or ranges a-b)"
            ),
        );
    }
    if let Some(r) = &s.restart {
        let ok = match r.split_once(':') {
            Some(("on-failure", n)) => n.parse::<u32>().is_ok(),
            Some(_) => false,
            None => ["no", "always", "unless-stopped", "on-failure"].contains(&r.as_str()),
        };
        if !ok {
            return bad(
                "restart",
                format!("`{r}` is not no, always, unless-stopped or on-failure[:N]"),
            );
        }
    }
    if let Some(m) = &s.memory {
        let digits = m.trim_end_matches(|c: char| "bBiIkKmMgGtT".contains(c));
        let unit = &m[digits.len()..].to_ascii_lowercase();
        let units = [
            "", "b", "k", "m", "g", "t", "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib",
        ];
        if digits.parse::<f64>().map_or(true, |n| n <= 0.0) || !units.contains(&unit.as_str()) {
            return bad("memory", format!("`{m}` is not a size such as 512m or 2g"));
        }
    }
    if let Some(c) = &s.cpus
        && c.parse::<f64>()
            .map_or(true, |n| n <= 0.0 || !n.is_finite())
    {
        return bad(
            "cpus",
            format!("`{c}` is not a number of CPUs above 0, such as 1.5"),
        );
    }
    if let Some(k) = s
        .env
        .keys()
        .find(|k| k.is_empty() || k.contains(|c: char| c == '=' || c.is_whitespace() || c == '\0'))
    {
        return bad("env", format!("`{k}` is not a variable name"));
    }
    if let Some(u) = s.health.as_ref().and_then(|h| h.url.as_deref())
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        return bad(
            "health.url",
            format!("`{u}` is not an http:// or https:// URL"),
        );
    }
    Ok(())
}

/// `[IP:][HOST_PORT]:PORT[/PROTO]` as `docker run -p` takes it (ports or ranges; an IPv6 address
/// in brackets).
fn port_mapping(p: &str) -> bool {
    let (rest, proto) = p.rsplit_once('/').unwrap_or((p, "tcp"));
    let port = |x: &str| x.parse::<u16>().is_ok_and(|n| n > 0);
    let ports = |x: &str| match x.split_once('-') {
        Some((a, b)) => port(a) && port(b),
        None => port(x),
    };
    if !["tcp", "udp", "sctp"].contains(&proto) {
        return false;
    }
    let Some((front, container)) = rest.rsplit_once(':') else {
        return ports(rest);
    };
    if !ports(container) {
        return false;
    }
    // `HOST_PORT`, `IP:HOST_PORT` or `IP:` (a port docker picks).
    match front.rsplit_once(':') {
        None => ports(front),
        Some((ip, host)) => (host.is_empty() || ports(host)) && !ip.is_empty(),
    }
}

fn check_health(name: &str, h: Option<&HealthCheck>) -> Result<(), SpecError> {
    match h.and_then(crate::playbook::health_problem) {
        Some((_, why)) => Err(SpecError::HealthField {
            name: name.into(),
            why,
        }),
        None => Ok(()),
    }
}

impl Resolved {
    /// A short hash of everything that shapes the container, secret values included (changing a
    /// password re-creates the container), the health probe excluded. Stored as the `ferry.spec`
    /// label, never shown: from it and the playbook a weak secret could be guessed offline.
    pub fn hash(&self) -> String {
        self.digest(true)
    }

    /// [`Self::hash`] without the secret values: what output and the ledger show.
    pub fn shown_hash(&self) -> String {
        self.digest(false)
    }

    fn digest(&self, secrets: bool) -> String {
        // How ferry probes health, or whether it may take a container over, is not part of the
        // container: changing it re-creates nothing.
        let shaping = ContainerSpec {
            health: None,
            adopt: false,
            ..self.spec.clone()
        };
        let mut h = blake3::Hasher::new();
        h.update(b"ferry container spec v1\0");
        h.update(
            serde_json::to_string(&shaping)
                .expect("spec serializes")
                .as_bytes(),
        );
        for (k, v) in self.secrets.iter().filter(|_| secrets) {
            h.update(b"\0secret\0");
            h.update(k.as_bytes());
            h.update(b"=");
            h.update(v.as_bytes());
        }
        h.finalize().to_hex()[..16].to_string()
    }

    /// The env file body for the secrets (`KEY=VALUE` lines), or `None` when there are none.
    pub fn secret_env_file(&self) -> Option<String> {
        if self.secrets.is_empty() {
            return None;
        }
        Some(
            self.secrets
                .iter()
                .map(|(k, v)| format!("{k}={v}\n"))
                .collect(),
        )
    }

    /// The `docker create` arguments (after the docker command itself). `labels` are ferry's
    /// bookkeeping labels; `secret_file` is the env file on the host holding the secrets.
    pub fn create_args(
        &self,
        labels: &BTreeMap<String, String>,
        secret_file: Option<&str>,
    ) -> Vec<String> {
        let s = &self.spec;
        let mut a: Vec<String> = vec!["create".into(), "--name".into(), s.name.clone()];
        let mut flag = |f: &str, v: &str| {
            a.push(f.into());
            a.push(v.into());
        };
        let mut all_labels = s.labels.clone();
        all_labels.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (k, v) in &all_labels {
            flag("--label", &format!("{k}={v}"));
        }
        for p in &s.ports {
            flag("--publish", p);
        }
        for (k, v) in &s.env {
            flag("--env", &format!("{k}={v}"));
        }
        if let Some(f) = &s.env_file {
            flag("--env-file", f);
        }
        if let Some(f) = secret_file {
            flag("--env-file", f);
        }
        for v in &s.volumes {
            flag("--volume", v);
        }
        for (opt, v) in [
            ("--network", &s.network),
            ("--restart", &s.restart),
            ("--log-driver", &s.log_driver),
            ("--user", &s.user),
            ("--workdir", &s.workdir),
            ("--memory", &s.memory),
            ("--cpus", &s.cpus),
        ] {
            if let Some(v) = v {
                flag(opt, v);
            }
        }
        for (k, v) in &s.log_opts {
            flag("--log-opt", &format!("{k}={v}"));
        }
        for h in &s.extra_hosts {
            flag("--add-host", h);
        }
        let mut tail: Vec<String> = Vec::new();
        if let Some(ep) = &s.entrypoint {
            // `--entrypoint` takes one word; the rest of the argv goes before the command.
            if let Some((first, rest)) = ep.split_first() {
                flag("--entrypoint", first);
                tail.extend(rest.iter().cloned());
            } else {
                flag("--entrypoint", "");
            }
        }
        if s.privileged {
            a.push("--privileged".into());
        }
        a.push(s.image.clone());
        a.extend(tail);
        if let Some(cmd) = &s.command {
            a.extend(cmd.iter().cloned());
        }
        a
    }
}

/// What keeps `r` from being an image reference docker takes (`[registry/]path[:tag][@digest]`,
/// as the distribution reference grammar has it), in words; `None` when it is one.
pub fn reference_problem(r: &str) -> Option<String> {
    let (name, digest) = r.split_once('@').map_or((r, None), |(n, d)| (n, Some(d)));
    if let Some(d) = digest {
        let hex = d.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(format!(
                "`@{d}` is not a digest (sha256: and 64 hex digits)"
            ));
        }
    }
    let (repo, tag) = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
        _ => (name, None),
    };
    if let Some(t) = tag {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let ok = (1..=128).contains(&t.len())
            && word(t.as_bytes()[0])
            && t.bytes().all(|b| word(b) || b == b'.' || b == b'-');
        if !ok {
            return Some(format!(
                "tag `{t}` is not one docker takes: up to 128 letters, digits, `_`, `.` and `-`, \
                 not starting with `.` or `-`"
            ));
        }
    }
    let mut parts: Vec<&str> = repo.split('/').collect();
    if names_registry(repo) {
        let host = parts.remove(0);
        let (h, port) = host
            .rsplit_once(':')
            .map_or((host, None), |(h, p)| (h, Some(p)));
        let host_ok = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !host_ok {
            return Some(format!("`{host}` is not a registry host[:port]"));
        }
    }
    // A path component: lowercase letters and digits, joined by `.`, `_`, `__` or dashes.
    let component = |c: &str| {
        let b = c.as_bytes();
        let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        !b.is_empty()
            && alnum(b[0])
            && alnum(b[b.len() - 1])
            && b.iter().all(|&x| alnum(x) || b"._-".contains(&x))
            && !c.contains("..")
            && !c.contains("___")
            && !c.contains("._")
            && !c.contains("_.")
            && !c.contains(".-")
            && !c.contains("-.")
            && !c.contains("_-")
            && !c.contains("-_")
    };
    if repo.len() > 255 || parts.iter().any(|c| !component(c)) {
        return Some(format!(
            "`{repo}` is not a repository name docker takes: lowercase letters, digits and \
             `/`-separated parts joined by `.`, `_` or `-`"
        ));
    }
    None
}

/// Whether an image reference names its registry host (`reg.example.com/shop:1`,
/// `127.0.0.1:5000/shop`, `localhost/x`), as opposed to a bare or Docker Hub name (`shop:1`).
pub fn names_registry(image: &str) -> bool {
    match image.split_once('/') {
        Some((first, _)) => first.contains('.') || first.contains(':') || first == "localhost",
        None => false,
    }
}

/// Whether an image with these `RepoDigests` was pulled from `image`'s own repository (so a local
/// copy of it is a registry's, and may be stale), as Docker lists them: `repo@sha256:...`.
pub fn pulled_from_own_repository(repo_digests: &[String], image: &str) -> bool {
    let name = image.split_once('@').map_or(image, |(n, _)| n);
    let repo = match name.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => name,
    };
    repo_digests
        .iter()
        .any(|d| d.split_once('@').is_some_and(|(r, _)| r == repo))
}

/// The name the previous container is kept under for rollback.
pub fn prev_name(name: &str) -> String {
    format!("{name}{PREV_SUFFIX}")
}

/// The name the old container has while its replacement is health-checked.
pub fn aside_name(name: &str) -> String {
    format!("{name}{ASIDE_SUFFIX}")
}

/// The name the container kept for rollback has while the run that replaced it may still fail.
pub fn older_name(name: &str) -> String {
    format!("{name}{OLDER_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(yaml: &str) -> ContainerSpec {
        let text = format!(
            "app: a\nenvironments:\n  e:\n    hosts: [h, web1, web2]\n    steps:\n      - container:\n{}",
            yaml.lines()
                .map(|l| format!("          {l}\n"))
                .collect::<String>()
        );
        let pb = crate::playbook::parse(&text, Path::new("t.yml")).unwrap();
        match &pb.environments["e"].steps[0] {
            crate::playbook::Step::Container(c) => c.clone(),
            _ => unreachable!(),
        }
    }

    fn vars(s: &str) -> Result<String, crate::template::TemplateError> {
        let v: crate::template::Vars = [
            ("host".to_string(), "web1".to_string()),
            ("sha".to_string(), "abc".to_string()),
        ]
        .into();
        crate::template::expand(s, &v)
    }

    fn env(k: &str) -> Result<String, String> {
        match k {
            "DB_PW" => Ok("s3cr3t pw".into()),
            _ => Err("which is not set".into()),
        }
    }

    const FULL: &str = "name: app-${host}\nimage: reg:5000/shop:${sha}\ncommand: [serve, --port, '8080']\nentrypoint: [/bin/sh, -c]\nports: ['8080:80']\nenv: { A: '1', REV: '${sha}' }\nsecret_env: { DB_PASSWORD: DB_PW }\nenv_file: /etc/app.env\nvolumes: ['/srv/a b:/srv:ro']\nnetwork: shop\nrestart: unless-stopped\nlog_driver: json-file\nlog_opts: { max-size: 10m }\nprivileged: true\nlabels: { team: web }\nuser: '1000'\nworkdir: /srv\nextra_hosts: ['db:10.0.0.2']\nmemory: 512m\ncpus: '1.5'\nhealth: { type: http, url: 'http://127.0.0.1:8080/health' }\nhosts:\n  web2: { ports: ['9090:80'], env: { B: '2' } }\n";

    #[test]
    fn values_docker_would_refuse_are_refused() {
        for p in [
            "8080",
            "80:8080",
            "127.0.0.1:80:8080",
            "127.0.0.1::8080",
            "[::1]:80:80/udp",
            "8000-8010:8000-8010",
        ] {
            assert!(port_mapping(p), "{p}");
        }
        for p in [
            "abc:8080",
            "99999:8080",
            "80:0",
            "80:8080/ftp",
            "",
            ":80:8080",
        ] {
            assert!(!port_mapping(p), "{p}");
        }
        let spec = |yaml: &str| -> ContainerSpec {
            serde_saphyr::from_str(&format!("name: web\nimage: img\n{yaml}")).unwrap()
        };
        for (yaml, field) in [
            ("restart: sometimes", "restart"),
            ("memory: lots", "memory"),
            ("cpus: '-1'", "cpus"),
            ("env: {\"A B\": x}", "env"),
            ("health: {type: http, url: 'ftp://x'}", "health.url"),
            ("ports: ['abc:8080']", "ports"),
        ] {
            match check_values(&spec(yaml)) {
                Err(SpecError::BadField { field: f, .. }) => assert_eq!(f, field, "{yaml}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
        for yaml in [
            "restart: on-failure:3",
            "memory: 512m",
            "memory: 2GB",
            "cpus: '1.5'",
        ] {
            check_values(&spec(yaml)).unwrap();
        }
        let mut s = spec("");
        s.image = String::new();
        assert!(check_values(&s).is_err());
        assert!(check_name("web.ferry-prev").is_err() && check_name("web").is_ok());
    }

    #[test]
    fn every_field_reaches_the_argv() {
        let r = resolve(&spec(FULL), "web1", &vars, &env).unwrap();
        let labels: BTreeMap<String, String> = [("ferry.spec".into(), r.hash())].into();
        let a = r.create_args(&labels, Some("/tmp/x.env"));
        let joined = crate::shell::join_str(&a);
        assert_eq!(
            joined,
            format!(
                "create --name app-web1 --label ferry.spec={} --label team=web --publish 8080:80 \
                 --env A=1 --env REV=abc --env-file /etc/app.env --env-file /tmp/x.env \
                 --volume '/srv/a b:/srv:ro' --network shop --restart unless-stopped \
                 --log-driver json-file --user 1000 --workdir /srv --memory 512m --cpus 1.5 \
                 --log-opt max-size=10m --add-host db:10.0.0.2 --entrypoint /bin/sh --privileged \
                 reg:5000/shop:abc -c serve --port 8080",
                r.hash()
            )
        );
        assert!(!joined.contains("s3cr3t"), "secrets never in argv");
        assert_eq!(
            r.secret_env_file().unwrap(),
            "DB_PASSWORD=s3cr3t pw\n".to_string()
        );
    }

    #[test]
    fn per_host_overrides_replace_only_given_fields() {
        let r = resolve(&spec(FULL), "web2", &vars, &env).unwrap();
        assert_eq!(r.spec.ports, ["9090:80"]);
        assert_eq!(r.spec.env.len(), 1, "a map override replaces the map");
        assert_eq!(r.spec.restart.as_deref(), Some("unless-stopped"));
        let r1 = resolve(&spec(FULL), "web1", &vars, &env).unwrap();
        assert_ne!(r.hash(), r1.hash());
    }

    #[test]
    fn bad_override_names_host_and_field() {
        // (A playbook with it does not load; the check at deploy time stays.)
        let mut s = spec("name: a\nimage: i\n");
        s.hosts
            .insert("web1".into(), serde_json::json!({ "portz": ["1:1"] }));
        let e = resolve(&s, "web1", &vars, &env).unwrap_err().to_string();
        assert!(e.contains("web1") && e.contains("portz"), "{e}");
    }

    #[test]
    fn a_local_image_pulled_from_its_own_repository_is_known() {
        let d = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hub = d(&["myorg/app@sha256:ab"]);
        assert!(pulled_from_own_repository(&hub, "myorg/app:latest"));
        assert!(pulled_from_own_repository(&hub, "myorg/app"));
        assert!(!pulled_from_own_repository(&hub, "other/app:latest"));
        // Built here and pushed elsewhere: the short name was never pulled.
        let pushed = d(&["127.0.0.1:5000/app@sha256:cd"]);
        assert!(!pulled_from_own_repository(&pushed, "app:v1"));
        assert!(pulled_from_own_repository(&pushed, "127.0.0.1:5000/app:v1"));
        assert!(!pulled_from_own_repository(&[], "app:v1"));
    }

    #[test]
    fn hash_is_stable_and_sees_secrets_and_fields() {
        let s = spec("name: a\nimage: i\nsecret_env: { P: DB_PW }\n");
        let a = resolve(&s, "h", &vars, &env).unwrap();
        assert_eq!(a.hash(), resolve(&s, "h", &vars, &env).unwrap().hash());
        let other_secret = resolve(&s, "h", &vars, &|_| Ok("other".into())).unwrap();
        assert_ne!(a.hash(), other_secret.hash());
        // What is shown does not depend on the secrets (a weak one could be guessed from it).
        assert_eq!(a.shown_hash(), other_secret.shown_hash());
        assert_ne!(a.shown_hash(), a.hash());
        let mut b = a.clone();
        b.spec.restart = Some("always".into());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 16);
        let mut c = a.clone();
        c.spec.health = Some(crate::playbook::HealthCheck {
            kind: crate::playbook::HealthKind::Tcp,
            url: None,
            address: Some("127.0.0.1:1".into()),
            timeout: std::time::Duration::from_secs(5),
            interval: Some(std::time::Duration::from_secs(1)),
        });
        assert_eq!(a.hash(), c.hash(), "the probe does not shape the container");
    }

    #[test]
    fn missing_secret_and_newline_are_clear_errors() {
        let s = spec("name: a\nimage: i\nsecret_env: { P: NOPE }\n");
        let e = resolve(&s, "h", &vars, &env).unwrap_err().to_string();
        assert!(e.contains("NOPE") && e.contains("not set"), "{e}");
        let s = spec("name: a\nimage: i\nsecret_env: { P: DB_PW }\n");
        let e = resolve(&s, "h", &vars, &|_| Ok("a\nb".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("newline") && !e.contains("a\nb"), "{e}");
    }

    #[test]
    fn names_and_health_fields_are_checked() {
        // (A playbook with it does not load; the check once templates are expanded stays.)
        let mut s = spec("name: a\nimage: i\n");
        s.name = "a b".into();
        assert!(matches!(
            resolve(&s, "h", &vars, &env),
            Err(SpecError::BadName { .. })
        ));
        let mut s = spec("name: a\nimage: i\nhealth: { type: tcp, address: 'x:1' }\n");
        // An override can drop a field the playbook check saw.
        s.hosts
            .insert("h".into(), serde_json::json!({"health": {"type": "tcp"}}));
        assert!(matches!(
            resolve(&s, "h", &vars, &env),
            Err(SpecError::HealthField { .. })
        ));
    }

    #[test]
    fn image_references_docker_would_refuse() {
        for ok in [
            "shop",
            "shop:v1.0.0",
            "127.0.0.1:5000/shop:release-1-4-aaaa",
            "reg.example.com/team/shop_api:1",
            "localhost/x__y:latest",
            "a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(reference_problem(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("shop:v1.0.0+meta", "tag `v1.0.0+meta`"),
            ("shop:.x", "tag `.x`"),
            ("Shop:1", "`Shop` is not a repository name"),
            ("reg.example.com/a..b:1", "`reg.example.com/a..b`"),
            ("shop:", "tag ``"),
            ("a@sha256:12", "not a digest"),
            ("reg:x5000/shop", "`reg:x5000` is not a registry"),
        ] {
            let got = reference_problem(bad).unwrap_or_default();
            assert!(got.contains(why), "{bad}: {got}");
        }
    }

    #[test]
    fn registry_hosts_in_image_names() {
        assert!(names_registry("127.0.0.1:5000/shop:1"));
        assert!(names_registry("registry.example.com/team/shop"));
        assert!(names_registry("localhost/shop"));
        assert!(!names_registry("shop:1"));
        assert!(!names_registry("library/redis:7"));
        assert!(!names_registry("ferry-t1-prune/app:v1"));
    }

    #[test]
    fn unknown_template_variable_fails() {
        let s = spec("name: a\nimage: 'i:${nope}'\n");
        let e = resolve(&s, "h", &vars, &env).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
