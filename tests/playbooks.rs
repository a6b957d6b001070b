//! The shipped playbooks in playbooks/: each parses, and each runs the way CI would against real
//! sshd (and docker/registry) test hosts.

use crate::support::*;

fn shipped(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("playbooks")
        .join(name)
}

#[test]
fn every_shipped_playbook_loads_and_routes_refs() {
    // `--plan` against hosts that do not exist would connect; `check` with a bogus env lists the
    // environments without connecting: the playbook itself must load cleanly.
    for (name, env) in [
        ("frontend-dist.yml", "production"),
        ("release-deploy.yml", "staging"),
        ("tag-publish.yml", "publish"),
    ] {
        let run = Ferry::new()
            .args(["check", "--env", "nope"])
            .arg(shipped(name))
            .run()
            .failure(2);
        assert!(
            run.stderr.contains(&format!("have: {env}")),
            "{name}: {}",
            run.stderr
        );
    }
    // A ref no rule matches deploys nothing and exits 0.
    let run = Ferry::new()
        .env("CI_COMMIT_REF_NAME", "feature/x")
        .env("CI_COMMIT_SHA", "0123456789abcdef0123456789abcdef01234567")
        .arg("deploy")
        .arg(shipped("release-deploy.yml"))
        .run()
        .success();
    assert!(
        run.stdout
            .contains("nothing to deploy for branch feature/x"),
        "{}",
        run.stdout
    );
}
