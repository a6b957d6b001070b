//! What is being deployed: ref, commit, pipeline and who, read from GitLab CI's variables, falling
//! back to git and `--ref`/`--sha` outside CI. These become template variables and ledger fields.

use std::process::Command;

use crate::template::{self, Vars};

/// The facts about one deploy run that every host records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DeployContext {
    /// Branch or tag name.
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub is_tag: bool,
    /// GitLab's slug of the ref (`CI_COMMIT_REF_SLUG` when it describes this ref, else computed).
    pub ref_slug: String,
    pub sha: String,
    pub pipeline_id: Option<String>,
    pub job_url: Option<String>,
    /// Who ran it (GitLab user or local user).
    pub user: String,
}

/// Why git would refuse `name` as a branch or tag name (`git check-ref-format --branch`), if so.
pub fn ref_problem(name: &str) -> Option<&'static str> {
    Some(if name.is_empty() {
        "it is empty"
    } else if name.chars().any(|c| c.is_control()) {
        "it holds control characters (newline, escape, ...)"
    } else if name.starts_with('-') {
        "it starts with `-`"
    } else if name.contains("..") {
        "it holds `..`"
    } else if name.chars().any(|c| " ~^:?*[\\".contains(c)) {
        "it holds a space or one of ~ ^ : ? * [ \\"
    } else if name.contains("@{") || name == "@" {
        "it holds `@{` or is `@`"
    } else if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        "it has an empty part between slashes"
    } else if name.ends_with('.') {
        "it ends with `.`"
    } else if name
        .split('/')
        .any(|c| c.starts_with('.') || c.ends_with(".lock"))
    {
        "a part between slashes starts with `.` or ends with `.lock`"
    } else {
        return None;
    })
}

impl DeployContext {
    /// Read from the environment: explicit flags win, then GitLab CI variables, then git. A run
    /// that ships no commit of its own (`ships_commit` false: a rollback goes to a commit from the
    /// ledger, a stop to none) takes a commit that cannot be told as all zeros, not as an error.
    pub fn detect(
        ref_flag: Option<&str>,
        sha_flag: Option<&str>,
        tag_flag: bool,
        ships_commit: bool,
    ) -> anyhow::Result<DeployContext> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let ci_tag = env("CI_COMMIT_TAG");
        let (ref_name, is_tag) = match (ref_flag, &ci_tag, env("CI_COMMIT_REF_NAME")) {
            (Some(r), _, _) => (r.to_string(), tag_flag),
            (None, Some(t), _) => (t.clone(), true),
            (None, None, Some(r)) => (r, false),
            (None, None, None) => match git(&["symbolic-ref", "--short", "-q", "HEAD"]) {
                Some(b) => (b, false),
                None => anyhow::bail!(
                    "cannot tell which ref this is: not in GitLab CI and not on a git branch; pass --ref"
                ),
            },
        };
        // What git refuses in a branch or tag name, ferry refuses too: it reaches paths, shell
        // words, tables, logs and the ledger (a leading `-` reads as an option, `..` climbs).
        if let Some(why) = ref_problem(&ref_name) {
            anyhow::bail!(
                "ref {ref_name:?} is not a name git gives a branch or tag: {why}; pass the branch \
                 or tag name"
            );
        }
        let sha = match sha_flag
            .map(str::to_string)
            .or_else(|| env("CI_COMMIT_SHA"))
            .or_else(|| git(&["rev-parse", "HEAD"]))
        {
            Some(s) => s,
            None if !ships_commit => "0".repeat(40),
            None => {
                anyhow::bail!("cannot tell which commit this is: set CI_COMMIT_SHA or pass --sha")
            }
        };
        if !sha.chars().all(|c| c.is_ascii_hexdigit()) || sha.is_empty() || sha.len() > 64 {
            anyhow::bail!("commit `{sha}` is not a hex sha");
        }
        // GitLab's own slug wins when it is for this ref: not when --ref names another one, and
        // for an ASCII name (where ours is GitLab's rule exactly) only when the two agree.
        let ours = template::slug(&ref_name);
        let ref_slug = match env("CI_COMMIT_REF_SLUG") {
            Some(s)
                if ref_flag.is_none()
                    && s == template::slug(&s)
                    && (s == ours || !ref_name.is_ascii()) =>
            {
                s
            }
            _ => ours,
        };
        let user = env("GITLAB_USER_LOGIN")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "unknown".into());
        Ok(DeployContext {
            ref_name,
            is_tag,
            ref_slug,
            sha: sha.to_lowercase(),
            pipeline_id: env("CI_PIPELINE_ID"),
            job_url: env("CI_JOB_URL"),
            user,
        })
    }

    /// A context for reading hosts' state without a particular ref (`ferry status`, `lock`):
    /// ref-dependent parts of paths resolve to this placeholder and are not used.
    pub fn placeholder() -> DeployContext {
        DeployContext {
            ref_name: "ferry-any-ref".into(),
            is_tag: false,
            ref_slug: "ferry-any-ref".into(),
            sha: "0".repeat(40),
            pipeline_id: None,
            job_url: None,
            user: "ferry".into(),
        }
    }

    /// The commit could not be told: all zeros (see [`DeployContext::detect`]).
    pub fn commit_unknown(&self) -> bool {
        self.sha.bytes().all(|b| b == b'0')
    }

    pub fn short_sha(&self) -> &str {
        short_sha(&self.sha)
    }

    pub fn ref_slug(&self) -> String {
        self.ref_slug.clone()
    }

    /// Template variables derived from the deploy.
    pub fn vars(&self) -> Vars {
        let mut v = Vars::new();
        v.insert("ref".into(), self.ref_name.clone());
        v.insert("ref_slug".into(), self.ref_slug());
        v.insert(
            "tag".into(),
            if self.is_tag {
                self.ref_name.clone()
            } else {
                String::new()
            },
        );
        v.insert("sha".into(), self.sha.clone());
        v.insert("short_sha".into(), self.short_sha().into());
        v.insert(
            "pipeline_id".into(),
            self.pipeline_id.clone().unwrap_or_else(|| "0".into()),
        );
        v.insert("user".into(), self.user.clone());
        v
    }
}

/// A CI/CD variable that holds text: its value, or, for a GitLab variable of type File (the value
/// is the path of a file holding it), that file's content. `None` when unset or empty. A value
/// that is an absolute path (neither a key nor known_hosts text starts with `/`) whose file
/// cannot be read is an error that says so.
pub fn text_variable(name: &str) -> Result<Option<String>, String> {
    let Some(value) = std::env::var(name).ok().filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let path = std::path::Path::new(value.trim());
    if value.trim().contains('\n') || !path.is_absolute() {
        return Ok(Some(value));
    }
    std::fs::read_to_string(path).map(Some).map_err(|e| {
        format!(
            "{name} holds the path {}, which cannot be read ({e}); set {name} to the text itself \
             (or, as a GitLab variable of type File, to a file that exists)",
            path.display()
        )
    })
}

/// The first 8 characters of a commit, as people quote it. Never panics: a sha read back from a
/// host may be anything.
pub fn short_sha(sha: &str) -> &str {
    sha.get(..8).unwrap_or(sha)
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// True when running inside a GitLab CI job.
pub fn in_gitlab_ci() -> bool {
    std::env::var_os("GITLAB_CI").is_some()
}

/// The controller's host name (the CI runner), recorded with locks and ledger lines.
pub fn controller_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// A variable of the job's environment that a playbook names for a secret (`secret_env`,
/// `password_env`): its value, or why there is none to use, worded to follow "environment
/// variable NAME, ": unset, or not UTF-8 text (which ferry cannot pass on as it is).
pub fn secret_var(name: &str) -> Result<String, String> {
    match std::env::var(name) {
        Ok(v) => Ok(v),
        Err(std::env::VarError::NotPresent) => Err("which is not set".into()),
        Err(std::env::VarError::NotUnicode(_)) => Err("which does not hold UTF-8 text".into()),
    }
}

/// [`secret_var`] for a password (`docker_login`'s `password_env`): empty is no password either.
pub fn password_var(name: &str) -> Result<String, String> {
    match secret_var(name)? {
        p if p.is_empty() => Err("which is empty".into()),
        p => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::ref_problem;

    #[test]
    fn refs_git_would_refuse_are_refused() {
        for ok in [
            "main",
            "release-1.2",
            "feature/äöü-ünïcode",
            "release-$(touch${IFS}/tmp/x)",
            "x;reboot",
            "v1.0.0+build",
        ] {
            assert_eq!(ref_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "--version",
            "-x",
            "../../etc",
            "a..b",
            "with space",
            "a:b",
            "a~1",
            "a^",
            "a?",
            "a*",
            "a[b",
            "a\\b",
            "a@{1}",
            "@",
            "/a",
            "a/",
            "a//b",
            "a.",
            ".hidden",
            "a/.b",
            "x.lock",
            "a/b.lock/c",
            "line\nbreak",
        ] {
            assert!(ref_problem(bad).is_some(), "{bad:?}");
        }
    }
}
