//! `${name}` templates in playbook values (paths, image names, env values).
//!
//! Expansion is a pure function over a variable map and an environment lookup. An unknown name is an
//! error, never an empty string, so a typo cannot turn `/srv/review/${ref_slug}` into `/srv/review/`.
//! `$$` is a literal `$`. `${env.NAME}` reads the controller's environment, `${env.NAME:-default}` with
//! a fallback (for addresses and settings, not secrets: secrets go through `secret_env`/`password_env`).

use std::collections::BTreeMap;

pub type Vars = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown variable `${{{name}}}` in `{template}` (known: {known})")]
    Unknown {
        name: String,
        template: String,
        known: String,
    },
    #[error("unclosed `${{` in `{template}`")]
    Unclosed { template: String },
    #[error(
        "`${{{name}}}` holds characters a shell would read as more than one plain word here (in `{template}`): \
         a command given as one string takes only values of letters, digits and `_ . / : @ % + = , -`. \
         Use `${{ref_slug}}`, or the list form, which quotes each word: \
         `command: [sh, -c, 'echo \"$1\"', sh, \"${{{name}}}\"]`"
    )]
    Unsafe { name: String, template: String },
    #[error(
        "environment variable {name} is not set (used in `{template}`); set it or give a default: `${{env.{name}:-value}}`"
    )]
    UnsetEnv { name: String, template: String },
}

impl TemplateError {
    /// The text at fault, as it stands in the playbook: what to look for to point at its line.
    pub fn needle(&self) -> String {
        match self {
            TemplateError::Unknown { name, .. } | TemplateError::Unsafe { name, .. } => {
                format!("${{{name}}}")
            }
            // (Only a reference without a default can be unset.)
            TemplateError::UnsetEnv { name, .. } => format!("${{env.{name}}}"),
            TemplateError::Unclosed { template } => template.clone(),
        }
    }
}

/// Replace every `${name}` in `template` with its value from `vars`, and `${env.NAME}` from the
/// process environment.
pub fn expand(template: &str, vars: &Vars) -> Result<String, TemplateError> {
    expand_with(template, vars, &|k| std::env::var(k).ok())
}

/// [`expand`] for a command line a shell will read (a `run` command given as one string): every
/// value put in must be one plain word in any quoting (a branch named `x;reboot` or `$(id)` must
/// not become code), else [`TemplateError::Unsafe`]. Defaults written in the template are the
/// author's own and pass as they are.
pub fn expand_shell(template: &str, vars: &Vars) -> Result<String, TemplateError> {
    expand_inner(template, vars, &|k| std::env::var(k).ok(), true)
}

/// Whether `s` reads as the same single word (or, empty, as nothing) to a shell, quoted or not.
fn shell_plain(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_./:@%+=,-".contains(&b))
}

/// [`expand`] with an explicit environment lookup.
pub fn expand_with(
    template: &str,
    vars: &Vars,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    expand_inner(template, vars, env, false)
}

fn expand_inner(
    template: &str,
    vars: &Vars,
    env: &dyn Fn(&str) -> Option<String>,
    shell: bool,
) -> Result<String, TemplateError> {
    let unsafe_value = |name: &str, value: &str| {
        (shell && !shell_plain(value)).then(|| TemplateError::Unsafe {
            name: name.into(),
            template: template.into(),
        })
    };
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| TemplateError::Unclosed {
                template: template.into(),
            })?;
            let name = &r[..end];
            if let Some(var) = name.strip_prefix("env.") {
                let (var, default) = match var.split_once(":-") {
                    Some((v, d)) => (v, Some(d)),
                    None => (var, None),
                };
                match (env(var).filter(|v| !v.is_empty()), default) {
                    (Some(v), _) => match unsafe_value(name, &v) {
                        Some(e) => return Err(e),
                        None => out.push_str(&v),
                    },
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {
                        return Err(TemplateError::UnsetEnv {
                            name: var.into(),
                            template: template.into(),
                        });
                    }
                }
            } else {
                let value = vars.get(name).ok_or_else(|| TemplateError::Unknown {
                    name: name.into(),
                    template: template.into(),
                    known: vars.keys().cloned().collect::<Vec<_>>().join(", "),
                })?;
                if let Some(e) = unsafe_value(name, value) {
                    return Err(e);
                }
                out.push_str(value);
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// GitLab's `CI_COMMIT_REF_SLUG`: lowercased, anything but `a-z0-9` becomes `-`, at most 63 bytes, no
/// leading or trailing `-`. Safe in paths, hostnames, container and image tag names whatever the ref is.
pub fn slug(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cut: String = mapped.chars().take(63).collect();
    let trimmed = cut.trim_matches('-');
    if trimmed.is_empty() {
        "ref".to_string()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        [("ref_slug", "release-1-2"), ("pipeline_id", "42")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_shell_command_takes_only_plain_values() {
        let mut v = vars();
        v.insert("ref".into(), "release/1.2".into());
        v.insert("tag".into(), String::new());
        assert_eq!(
            expand_shell("cd /srv/${ref} && echo \"${tag}\" '${pipeline_id}'", &v).unwrap(),
            "cd /srv/release/1.2 && echo \"\" '42'"
        );
        for hostile in [
            "x;reboot", "$(id)", "`id`", "it's", "a\"b", "a b", "a\nb", "*", "~x",
        ] {
            v.insert("ref".into(), hostile.into());
            let e = expand_shell("echo '${ref}'", &v).unwrap_err();
            assert!(matches!(&e, TemplateError::Unsafe { name, .. } if name == "ref"));
            assert_eq!(e.needle(), "${ref}");
            // Elsewhere (a path, a label) the value goes in as it is.
            assert_eq!(expand("${ref}", &v).unwrap(), hostile);
        }
        // A default the template itself gives is the author's.
        assert_eq!(
            expand_shell("echo ${env.FERRY_TEST_UNSET_VAR:-a b}", &v).unwrap(),
            "echo a b"
        );
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(
            expand("reg/app:${ref_slug}.${pipeline_id}", &vars()).unwrap(),
            "reg/app:release-1-2.42"
        );
        assert_eq!(
            expand("cost $$5 and $HOME", &vars()).unwrap(),
            "cost $5 and $HOME"
        );
    }

    #[test]
    fn unknown_and_unclosed_are_errors() {
        assert!(
            matches!(expand("/srv/${ref_slu}", &vars()), Err(TemplateError::Unknown { name, .. }) if name == "ref_slu")
        );
        assert!(matches!(
            expand("${ref_slug", &vars()),
            Err(TemplateError::Unclosed { .. })
        ));
    }

    #[test]
    fn environment_lookups_with_defaults() {
        let env = |k: &str| (k == "WEB1").then(|| "10.0.0.5".to_string());
        assert_eq!(
            expand_with("deploy@${env.WEB1}:22", &vars(), &env).unwrap(),
            "deploy@10.0.0.5:22"
        );
        assert_eq!(
            expand_with("${env.WEB2:-web2.example.com}", &vars(), &env).unwrap(),
            "web2.example.com"
        );
        assert!(matches!(
            expand_with("${env.WEB2}", &vars(), &env),
            Err(TemplateError::UnsetEnv { .. })
        ));
    }

    #[test]
    fn slugs_of_hostile_refs() {
        assert_eq!(
            slug("release-$(touch${IFS}/tmp/pwned)"),
            "release---touch--ifs--tmp-pwned"
        );
        assert_eq!(slug("feature/äöü-ünïcode"), "feature------n-code");
        assert_eq!(slug(&"x".repeat(200)).len(), 63);
        assert_eq!(slug("---"), "ref");
        assert_eq!(slug("Release-1.2"), "release-1-2");
    }
}
