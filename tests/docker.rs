//! Containers (issue 4): the real `ferry` binary, through real sshd hosts, against a real Docker
//! engine and registry. Two hosts share the one engine, so names and ports are per host.

use crate::support::docker::*;
use crate::support::*;

/// A playbook with environment `test` over named hosts (`web1`, `web2`, ...) and `steps` (YAML,
/// indented for the `steps:` list). `pub` for reuse by other topic modules.
pub fn pb(
    dir: &TempDir,
    hosts: &[(&str, &Sshd)],
    env_extra: &str,
    steps: &str,
) -> std::path::PathBuf {
    let hosts_yaml: String = hosts
        .iter()
        .map(|(n, h)| format!("      - {{ name: {n}, host: \"{}\" }}\n", h.address()))
        .collect();
    // FERRY_TEST_DOCKER runs the tests through another docker CLI (e.g. Debian's /usr/bin/docker).
    let env_extra = match std::env::var("FERRY_TEST_DOCKER") {
        Ok(cli) if !env_extra.contains("docker:") => {
            format!("{env_extra}    docker: {{ command: [\"{cli}\"] }}\n")
        }
        _ => env_extra.to_string(),
    };
    // Each host gets its own root (its locks, ledger and env files): the test hosts share one
    // filesystem, real hosts do not.
    let text = format!(
        "app: testapp\nenvironments:\n  test:\n    root: \"{root}/${{host}}\"\n{env_extra}    hosts:\n{hosts_yaml}    steps:\n{steps}",
        root = dir.join("root").display()
    );
    dir.write("ferry.yml", text)
}

/// A pass-through `docker` for the host that appends each argv (one argument per line) to
/// `argv.log` in `dir`, then runs the real CLI: what a `ps` on the host could have seen.
fn recording_docker(dir: &TempDir) -> (String, std::path::PathBuf) {
    let log = dir.join("argv.log");
    let script = dir.write(
        "docker-recorder",
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            docker_path()
        ),
    );
    run_ok(std::process::Command::new("chmod").arg("755").arg(&script));
    (
        format!("    docker: {{ command: [\"{}\"] }}\n", script.display()),
        log,
    )
}

fn deploy(hosts: &[&Sshd], pb: &std::path::Path, sha: &str) -> Run {
    Ferry::new()
        .trusting(hosts)
        .arg("deploy")
        .arg(pb)
        .args(["--env", "test", "--ref", "main", "--sha", sha])
        .env("REGISTRY_PASSWORD", REGISTRY_PASSWORD)
        .run()
}

fn container_image(name: &str) -> String {
    docker(&["container", "inspect", "--format", "{{.Image}}", name])
}

fn container_id(name: &str) -> String {
    docker(&["container", "inspect", "--format", "{{.Id}}", name])
}

fn container_state(name: &str) -> String {
    docker(&[
        "container",
        "inspect",
        "--format",
        "{{.State.Status}}",
        name,
    ])
}

/// The service container over its life: plan, first run on two hosts sharing one engine, an
/// idempotent no-op, an update when the tag moves, and `ferry rollback`.
#[test]
fn container_first_run_noop_update_and_rollback() {
    engine();
    let (w1, w2) = (Sshd::start(), Sshd::start());
    let prefix = unique("life");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let (p1, p2) = (free_port(), free_port());
    let image = pushed_image(&prefix, "live", "v1", true);
    let dir = TempDir::new("dlife");
    let steps = format!(
        "      - container:\n          name: \"{prefix}-${{host}}\"\n          image: \"{image}\"\n          \
         env: {{ GREETING: \"hello from ${{host}}\" }}\n          restart: unless-stopped\n          \
         ports: [\"127.0.0.1:{p1}:8080\"]\n          \
         health: {{ type: http, url: \"http://127.0.0.1:{p1}/health\", timeout: 20s, interval: 200ms }}\n          \
         hosts:\n            web2:\n              ports: [\"127.0.0.1:{p2}:8080\"]\n              \
         health: {{ type: http, url: \"http://127.0.0.1:{p2}/health\", timeout: 20s, interval: 200ms }}\n"
    );
    let pb = pb(&dir, &[("web1", &w1), ("web2", &w2)], "", &steps);
    let (n1, n2) = (format!("{prefix}-web1"), format!("{prefix}-web2"));

    let plan = Ferry::new()
        .trusting(&[&w1, &w2])
        .arg("deploy")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "aaaa", "--plan"])
        .run()
        .success();
    assert!(
        plan.all().contains(&format!("would create {n1}")),
        "{}",
        plan.all()
    );
    assert!(
        !docker_try(&["container", "inspect", &n1]).0,
        "plan changed nothing"
    );

    let first = deploy(&[&w1, &w2], &pb, "aaaa").success();
    assert!(
        first.all().contains(&format!("created {n1}")),
        "{}",
        first.all()
    );
    assert_eq!(http_get(p1, "/version").as_deref(), Some("v1\n"));
    assert_eq!(http_get(p2, "/version").as_deref(), Some("v1\n"));
    let id1 = container_id(&n1);
    let labels = docker(&[
        "container",
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        &n2,
    ]);
    assert!(
        labels.contains("\"ferry.ref\":\"main\"") && labels.contains("ferry.spec"),
        "{labels}"
    );
    let env = docker(&[
        "container",
        "inspect",
        "--format",
        "{{json .Config.Env}}",
        &n2,
    ]);
    assert!(env.contains("hello from web2"), "{env}");

    // Same spec, same image: nothing happens, and the step says so.
    let again = Ferry::new()
        .trusting(&[&w1, &w2])
        .arg("deploy")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "aaaa", "--json"])
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&again.stdout).expect(&again.stdout);
    for host in v.as_array().unwrap() {
        let step = &host["steps"][0];
        assert_eq!(step["changed"], false, "{step}");
        assert!(
            step["summary"].as_str().unwrap().contains("up to date"),
            "{step}"
        );
    }
    assert_eq!(container_id(&n1), id1);

    // The tag moves to a new image: pull first, replace, keep the old one for rollback.
    pushed_image(&prefix, "live", "v2", true);
    let update = deploy(&[&w1, &w2], &pb, "bbbb").success();
    assert!(
        update.all().contains(&format!("replaced {n1}")),
        "{}",
        update.all()
    );
    assert_eq!(http_get(p1, "/version").as_deref(), Some("v2\n"));
    assert_eq!(http_get(p2, "/version").as_deref(), Some("v2\n"));
    assert_eq!(container_state(&format!("{n1}.ferry-prev")), "exited");
    assert!(!docker_try(&["container", "inspect", &format!("{n1}.ferry-aside")]).0);

    // Rollback brings v1 back; the v2 container becomes the kept one.
    let rb = Ferry::new()
        .trusting(&[&w1, &w2])
        .arg("rollback")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "bbbb"])
        .run()
        .success();
    assert!(
        rb.all().contains(&format!("rolled {n1} back")),
        "{}",
        rb.all()
    );
    assert_eq!(http_get(p1, "/version").as_deref(), Some("v1\n"));
    assert_eq!(http_get(p2, "/version").as_deref(), Some("v1\n"));
    let kept = container_image(&format!("{n1}.ferry-prev"));
    assert_ne!(kept, container_image(&n1));

    // A second rollback would go further back in the ledger, but the deploy before the one now
    // live is the same commit (aaaa): there is nothing else to go back to.
    let rb2 = Ferry::new()
        .trusting(&[&w1, &w2])
        .arg("rollback")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "bbbb"])
        .run()
        .failure(1);
    assert!(
        rb2.all().contains("nothing to roll back to"),
        "{}",
        rb2.all()
    );
    assert_eq!(http_get(p1, "/version").as_deref(), Some("v1\n"));
    // Deploying bbbb again is how a rollback is undone.
    deploy(&[&w1, &w2], &pb, "bbbb").success();
    assert_eq!(http_get(p1, "/version").as_deref(), Some("v2\n"));
    assert_eq!(http_get(p2, "/version").as_deref(), Some("v2\n"));
}

/// A new image that never gets healthy: its logs are shown, it is removed, and the old container
/// serves again.
#[test]
fn health_failure_rolls_back_automatically() {
    engine();
    let host = Sshd::start();
    let prefix = unique("health");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let port = free_port();
    let image = pushed_image(&prefix, "live", "good-v1", true);
    let dir = TempDir::new("dhealth");
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
         ports: [\"127.0.0.1:{port}:8080\"]\n          \
         health: {{ type: http, url: \"http://127.0.0.1:{port}/health\", timeout: 8s, interval: 200ms }}\n"
    );
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    deploy(&[&host], &pb, "aaaa").success();
    assert_eq!(http_get(port, "/version").as_deref(), Some("good-v1\n"));
    let good = container_image(&prefix);

    pushed_image(&prefix, "live", "bad-v2", false);
    let run = deploy(&[&host], &pb, "bbbb").failure(1);
    let all = run.all();
    assert!(all.contains("failed and was removed"), "{all}");
    assert!(all.contains("the previous"), "{all}");
    assert!(
        all.contains("answered 404"),
        "the probe's last answer: {all}"
    );
    assert!(
        all.contains("serving bad-v2"),
        "the new container's logs: {all}"
    );
    assert_eq!(http_get(port, "/version").as_deref(), Some("good-v1\n"));
    assert_eq!(container_image(&prefix), good);
    assert_eq!(container_state(&prefix), "running");
    for leftover in [".ferry-aside", ".ferry-prev"] {
        assert!(
            !docker_try(&["container", "inspect", &format!("{prefix}{leftover}")]).0,
            "{leftover} should not exist after a failed first update"
        );
    }

    // A crash loop under `restart: always` fails fast (not after the whole health timeout).
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
         command: [/bin/sh, -c, 'echo boom; exit 3']\n          restart: always\n          \
         ports: [\"127.0.0.1:{port}:8080\"]\n          \
         health: {{ type: http, url: \"http://127.0.0.1:{port}/health\", timeout: 60s, interval: 200ms }}\n"
    );
    let dir2 = TempDir::new("dhealth2");
    let pb2 = crate::docker::pb(&dir2, &[("web1", &host)], "", &steps);
    let started = std::time::Instant::now();
    let run = deploy(&[&host], &pb2, "cccc").failure(1);
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
    assert!(run.all().contains("exited with code 3"), "{}", run.all());
    assert!(run.all().contains("boom"), "{}", run.all());
    assert_eq!(http_get(port, "/version").as_deref(), Some("good-v1\n"));
    assert_eq!(container_image(&prefix), good);

    // Without a health check, a container that exits after 1.2 s and is restarted by its
    // policy (so that it may be running at every look) is no success either.
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
         command: [/bin/sh, -c, 'sleep 1.2; exit 4']\n          restart: always\n"
    );
    let dir3 = TempDir::new("dhealth3");
    let pb3 = crate::docker::pb(&dir3, &[("web1", &host)], "", &steps);
    let run = deploy(&[&host], &pb3, "dddd").failure(1);
    assert!(run.all().contains("exited with code 4"), "{}", run.all());
    assert_eq!(http_get(port, "/version").as_deref(), Some("good-v1\n"));
    assert_eq!(container_image(&prefix), good);
}

/// Secret env values travel on stdin into a 0600 file that is gone after the container is created;
/// they reach the container but never ferry's output.
#[test]
fn secret_env_reaches_the_container_not_the_output() {
    engine();
    let dir = TempDir::new("dsecret");
    let (log_commands, commands) = logging_commands(dir.path());
    let host = Sshd::start_with(SshdOptions {
        extra_config: vec![log_commands],
        ..Default::default()
    });
    let prefix = unique("secret");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = format!("{prefix}:img");
    app_image(&image, "s1", true);
    let secret = format!("pw-{prefix}-'quoted' $(x)");
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
         secret_env: {{ DB_PASSWORD: TEST_DB_PW }}\n"
    );
    let (recorder, argv_log) = recording_docker(&dir);
    let pb = pb(&dir, &[("web1", &host)], &recorder, &steps);
    let run = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "aaaa", "-vv"])
        .env("TEST_DB_PW", &secret)
        .run()
        .success();
    assert!(
        !run.all().contains(&secret),
        "secret in output: {}",
        run.all()
    );
    let logged = std::fs::read_to_string(&commands).unwrap();
    assert!(
        logged.contains("docker"),
        "the wrapper saw the commands: {logged}"
    );
    assert!(
        !logged.contains(&format!("pw-{prefix}")),
        "secret on a command line: {logged}"
    );
    let env = docker(&[
        "container",
        "inspect",
        "--format",
        "{{json .Config.Env}}",
        &prefix,
    ]);
    assert!(
        env.contains(&format!("DB_PASSWORD={}", secret.replace('\'', "\\u0027")))
            || env.contains(&secret),
        "{env}"
    );
    let argv = std::fs::read_to_string(&argv_log).unwrap();
    assert!(argv.contains("--env-file"), "{argv}");
    assert!(!argv.contains(&secret), "secret on a command line: {argv}");
    // The file was written there (0600), and removed once the container was created.
    let left: Vec<_> = std::fs::read_dir(dir.join("root/web1/.ferry/docker"))
        .expect("the env file directory exists")
        .collect();
    assert!(left.is_empty(), "env file left behind: {left:?}");
}

/// A container that fails and prints its secrets: its logs are shown with them masked, and the
/// ledger keeps them masked too.
#[test]
fn a_failed_container_logs_its_secrets_masked() {
    engine();
    let dir = TempDir::new("dsecretlogs");
    let host = Sshd::start();
    let prefix = unique("leak");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = format!("{prefix}:img");
    app_image(&image, "s1", true);
    let secret = format!("pw-{prefix}-s3cret");
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
         command: [sh, -c, 'echo \"startup pw=$DB_PASSWORD\"; exit 1']\n          \
         secret_env: {{ DB_PASSWORD: TEST_DB_PW }}\n"
    );
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    let run = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "aaaa"])
        .env("TEST_DB_PW", &secret)
        .run()
        .failure(1);
    assert!(run.all().contains("startup pw=[MASKED]"), "{}", run.all());
    assert!(
        !run.all().contains(&secret),
        "secret in output: {}",
        run.all()
    );
    let ledger = std::fs::read_to_string(dir.join("root/web1/.ferry/ledger.jsonl")).unwrap();
    assert!(!ledger.contains(&secret), "secret in the ledger: {ledger}");
}

/// A container of the step's name that ferry did not start (run by hand, or another app's) is
/// not replaced, not even in a plan, until the step says `adopt: true`.
#[test]
fn a_container_ferry_did_not_start_is_adopted_only_when_asked() {
    engine();
    let host = Sshd::start();
    let prefix = unique("foreign");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = pushed_image(&prefix, "foreign", "v1", true);
    let name = format!("{prefix}-web");
    docker(&["run", "-d", "--name", &name, &image]);
    let hand = container_id(&name);
    let dir = TempDir::new("dforeign");
    let step = |adopt: &str| {
        format!("      - container: {{ name: \"{name}\", image: \"{image}\"{adopt} }}\n")
    };
    let on_stop = format!("    on_stop:\n      - docker_remove: {{ name: \"{name}\" }}\n");
    let refused_pb = pb(&dir, &[("web1", &host)], &on_stop, &step(""));
    // Nor removed by `ferry stop`.
    let stop = |plan: bool| {
        let mut ferry = Ferry::new()
            .trusting(&[&host])
            .arg("stop")
            .arg(&refused_pb)
            .args(["--env", "test", "--ref", "main", "--sha", "aaaa"]);
        if plan {
            ferry = ferry.arg("--plan");
        }
        ferry.run()
    };
    for plan in [true, false] {
        let run = stop(plan).failure(1);
        assert!(
            run.all().contains(&format!(
                "a container named {name} exists that ferry did not start"
            )) && run.all().contains("nothing was removed"),
            "{}",
            run.all()
        );
        assert_eq!(container_state(&name), "running");
    }
    for plan in [true, false] {
        let mut ferry = Ferry::new()
            .trusting(&[&host])
            .arg("deploy")
            .arg(&refused_pb)
            .args(["--env", "test", "--ref", "main", "--sha", "aaaa"]);
        if plan {
            ferry = ferry.arg("--plan");
        }
        let run = ferry.run().failure(1);
        assert!(
            run.all().contains(&format!(
                "a container named {name} exists that ferry did not start"
            )) && run.all().contains("adopt: true"),
            "{}",
            run.all()
        );
        assert_eq!(container_id(&name), hand);
        assert_eq!(container_state(&name), "running");
    }
    let adopting = pb(&dir, &[("web1", &host)], &on_stop, &step(", adopt: true"));
    let run = deploy(&[&host], &adopting, "aaaa").success();
    assert!(
        run.all().contains(&format!("replaced {name}")),
        "{}",
        run.all()
    );
    assert_ne!(container_id(&name), hand);
    assert_eq!(container_id(&format!("{name}.ferry-prev")), hand);
    // Adopted, it is ferry's: the step without `adopt` goes on with it, and `ferry stop` removes
    // it with the one it replaced.
    let refused_pb = pb(&dir, &[("web1", &host)], &on_stop, &step(""));
    deploy(&[&host], &refused_pb, "bbbb").success();
    let run = stop(false).success();
    assert!(
        run.all()
            .contains(&format!("removed {name}, {name}.ferry-prev")),
        "{}",
        run.all()
    );
}

/// A build whose step fails is reported with docker's words, and leaves no container behind.
#[test]
fn failed_build_leaves_no_container() {
    engine();
    let host = Sshd::start();
    let prefix = unique("badbuild");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let base = format!("{prefix}-base:1");
    app_image(&base, "base", true);
    let dir = TempDir::new("dbadbuild");
    dir.write(
        "root/build/context/Dockerfile",
        format!("FROM {base}\nRUN printf 'main.c:%d: error\\n' 42 && exit 3\n"),
    );
    let steps = format!(
        "      - docker_build: {{ context: context, tag: \"{prefix}-app:1\", timeout: 2m }}\n"
    );
    let pb_path = pb(&dir, &[("build", &host)], "", &steps);
    let run = deploy(&[&host], &pb_path, "aaaa").failure(1);
    assert!(
        run.all()
            .contains(&format!("docker build of {prefix}-app:1"))
            && run.all().contains("main.c:42: error"),
        "{}",
        run.all()
    );
    let left = docker(&["ps", "-aq", "--filter", &format!("ancestor={base}")]);
    assert_eq!(left.trim(), "", "the failed step's container is left");
}

/// The tag-triggered publish: login, build on the host, tag to the git tag, push; then another
/// host pulls it from the registry, and pruning keeps the image a container uses.
#[test]
fn tag_push_pull_through_the_registry() {
    engine();
    let host = Sshd::start();
    let prefix = unique("publish");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let base = format!("{prefix}-base:1");
    app_image(&base, "base", true);
    let dir = TempDir::new("dpublish");
    dir.write(
        "root/build/context/Dockerfile",
        format!("FROM {base}\nCOPY release.txt /www/release.txt\n"),
    );
    dir.write("root/build/context/release.txt", "built by ferry\n");
    let repo = format!("{REGISTRY}/{prefix}/shop");
    let steps = format!(
        "      - docker_login: {{ registry: \"{REGISTRY}\", user: {REGISTRY_USER}, password_env: REGISTRY_PASSWORD }}\n\
         \x20     - docker_build: {{ context: context, tag: \"{repo}:build-${{pipeline_id}}\", timeout: 5m }}\n\
         \x20     - docker_tag: {{ source: \"{repo}:build-${{pipeline_id}}\", target: \"{repo}:${{tag}}\" }}\n\
         \x20     - docker_push: {{ image: \"{repo}:${{tag}}\" }}\n"
    );
    let pb_path = pb(&dir, &[("build", &host)], "", &steps);
    let plan = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb_path)
        .args([
            "--env", "test", "--ref", "v1.2.3", "--tag", "--sha", "cccc", "--plan",
        ])
        .env("CI_PIPELINE_ID", "4242")
        .env("REGISTRY_PASSWORD", REGISTRY_PASSWORD)
        .run()
        .success();
    for would in [
        format!("would log in to {REGISTRY} as {REGISTRY_USER}"),
        format!("would build {repo}:build-4242"),
        format!("would tag {repo}:build-4242 as {repo}:v1.2.3"),
        format!("would push {repo}:v1.2.3"),
    ] {
        assert!(plan.all().contains(&would), "{would}: {}", plan.all());
    }
    assert!(!docker_try(&["image", "inspect", &format!("{repo}:build-4242")]).0);
    // Without the password, nothing runs: a configuration error, before any host is touched.
    let unset = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb_path)
        .args(["--env", "test", "--ref", "v1.2.3", "--tag", "--sha", "cccc"])
        .run()
        .failure(2);
    assert!(
        unset.all().contains("REGISTRY_PASSWORD, which is not set"),
        "{}",
        unset.all()
    );
    assert!(
        !dir.join("root/build/.ferry").exists(),
        "the host was touched"
    );
    let run = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb_path)
        .args(["--env", "test", "--ref", "v1.2.3", "--tag", "--sha", "cccc"])
        .env("CI_PIPELINE_ID", "4242")
        .env("REGISTRY_PASSWORD", REGISTRY_PASSWORD)
        .run()
        .success();
    assert!(
        run.all().contains(&format!("pushed {repo}:v1.2.3")),
        "{}",
        run.all()
    );
    assert!(!run.all().contains(REGISTRY_PASSWORD));
    let tagged = format!("{repo}:v1.2.3");
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &tagged]);

    // The tag's pipeline again: the same image is there already; another build of it is refused.
    let again = |pipeline: &str| {
        Ferry::new()
            .trusting(&[&host])
            .arg("deploy")
            .arg(&pb_path)
            .args(["--env", "test", "--ref", "v1.2.3", "--tag", "--sha", "cccc"])
            .env("CI_PIPELINE_ID", pipeline)
            .env("REGISTRY_PASSWORD", REGISTRY_PASSWORD)
            .run()
    };
    let same = again("4242").success();
    assert!(
        same.all()
            .contains(&format!("{tagged} is in the registry already")),
        "{}",
        same.all()
    );
    dir.write("root/build/context/release.txt", "built again\n");
    let other = again("4243").failure(1);
    assert!(
        other.all().contains(&format!(
            "the registry already has {tagged}, as another image"
        )),
        "{}",
        other.all()
    );
    // The host's tag names the registry's image again, not the refused build.
    assert_eq!(
        docker(&["image", "inspect", "--format", "{{.Id}}", &tagged]),
        id
    );
    docker(&["rmi", &format!("{repo}:build-4243")]);

    // Forget it locally, then a pull step gets it back from the registry (the first build).
    docker(&["rmi", &tagged, &format!("{repo}:build-4242")]);
    let dir2 = TempDir::new("dpull");
    let steps = format!("      - docker_pull: {{ image: \"{tagged}\" }}\n");
    let pb2 = pb(&dir2, &[("web1", &host)], "", &steps);
    let pulled = deploy(&[&host], &pb2, "cccc").success();
    assert!(
        pulled.all().contains(&format!("pulled {tagged}")),
        "{}",
        pulled.all()
    );
    assert_eq!(
        docker(&["image", "inspect", "--format", "{{.Id}}", &tagged]),
        id
    );
    let out = docker(&["run", "--rm", &tagged, "cat", "/www/release.txt"]);
    assert_eq!(out, "built by ferry");
}

/// Prune keeps the newest N, never an image a container uses (the kept rollback container
/// included), survives `<none>` entries, and only untags a multiply-tagged image.
#[test]
fn prune_keeps_newest_and_images_in_use() {
    engine();
    let host = Sshd::start();
    let prefix = unique("prune");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let repo = format!("{prefix}/app");
    let mut ids = Vec::new();
    for v in 1..=5 {
        ids.push(app_image(&format!("{repo}:v{v}"), &format!("v{v}"), true));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // v1 is what the kept rollback container runs (stopped).
    docker(&[
        "create",
        "--name",
        &format!("{prefix}-app.ferry-prev"),
        &format!("{repo}:v1"),
    ]);
    // v2 also carries another repository's tag: prune must only untag ours.
    docker(&["tag", &format!("{repo}:v2"), &format!("{prefix}/mirror:v2")]);
    // A `<none>` entry: an image whose only tag moved away.
    app_image(&format!("{repo}:moving"), "old", true);
    app_image(&format!("{repo}:moving"), "new", true);
    let dir = TempDir::new("dprune");
    let steps = format!("      - docker_prune: {{ repository: \"{repo}\", keep: 2 }}\n");
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    let run = deploy(&[&host], &pb, "aaaa").success();
    let all = run.all();
    let exists = |r: &str| docker_try(&["image", "inspect", r]).0;
    // Newest two: `moving` (new) and v5.
    assert!(exists(&format!("{repo}:moving")), "{all}");
    assert!(exists(&format!("{repo}:v5")), "{all}");
    assert!(
        exists(&format!("{repo}:v1")),
        "in use by the rollback container: {all}"
    );
    assert!(
        !exists(&format!("{repo}:v2")) && exists(&ids[1]),
        "untagged, image kept: {all}"
    );
    assert!(exists(&format!("{prefix}/mirror:v2")));
    assert!(!exists(&format!("{repo}:v3")) && !exists(&ids[2]), "{all}");
    assert!(!exists(&format!("{repo}:v4")), "{all}");
    assert!(all.contains("a container uses it"), "{all}");
    docker(&["rmi", &format!("{prefix}/mirror:v2")]);
}

/// Accessories start if missing, are left alone when nothing changed (even if the tag moved), and
/// are replaced when their spec changes.
#[test]
fn accessory_started_once_and_replaced_on_spec_change() {
    engine();
    let host = Sshd::start();
    let prefix = unique("acc");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = format!("{prefix}-img:7");
    app_image(&image, "r1", true);
    let dir = TempDir::new("dacc");
    let step = |mode: &str| {
        format!(
            "      - accessory:\n          name: \"{prefix}-redis\"\n          image: \"{image}\"\n          \
             env: {{ MODE: {mode} }}\n          restart: unless-stopped\n"
        )
    };
    let pb1 = pb(&dir, &[("web1", &host)], "", &step("a"));
    let first = deploy(&[&host], &pb1, "aaaa").success();
    assert!(first.all().contains("created"), "{}", first.all());
    let name = format!("{prefix}-redis");
    let id = container_id(&name);
    app_image(&image, "r2", true);
    let second = deploy(&[&host], &pb1, "bbbb").success();
    assert!(second.all().contains("up to date"), "{}", second.all());
    assert_eq!(container_id(&name), id);
    let pb2 = pb(&dir, &[("web1", &host)], "", &step("b"));
    let third = deploy(&[&host], &pb2, "bbbb").success();
    assert!(third.all().contains("spec changed"), "{}", third.all());
    assert_ne!(container_id(&name), id);
    // Replaced again: one container is kept (`.ferry-prev`), none left waiting as `.ferry-older`
    // (a failed run takes back only service containers).
    let pb3 = pb(&dir, &[("web1", &host)], "", &step("c"));
    deploy(&[&host], &pb3, "cccc").success();
    assert!(docker_try(&["container", "inspect", &format!("{name}.ferry-prev")]).0);
    assert!(!docker_try(&["container", "inspect", &format!("{name}.ferry-older")]).0);
}

/// A wrong registry password: a clear error naming the registry, and the password nowhere.
#[test]
fn wrong_registry_password_is_clear_and_never_shown() {
    engine();
    let host = Sshd::start();
    let dir = TempDir::new("dlogin");
    let steps = format!(
        "      - docker_login: {{ registry: \"{REGISTRY}\", user: {REGISTRY_USER}, password_env: REG_PW }}\n"
    );
    let (recorder, argv_log) = recording_docker(&dir);
    let pb = pb(&dir, &[("web1", &host)], &recorder, &steps);
    let wrong = format!("wrong-{}-Pa55", unique("pw"));
    let run = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "aaaa", "-vv"])
        .env("REG_PW", &wrong)
        .run()
        .failure(1);
    let all = run.all();
    assert!(
        all.contains(&format!(
            "docker login to {REGISTRY} as `{REGISTRY_USER}` failed"
        )),
        "{all}"
    );
    assert!(
        all.contains("REG_PW") && all.to_lowercase().contains("unauthorized"),
        "{all}"
    );
    assert!(!all.contains(&wrong), "password leaked: {all}");
    let argv = std::fs::read_to_string(&argv_log).unwrap();
    assert!(argv.contains("--password-stdin"), "{argv}");
    assert!(!argv.contains(&wrong), "password on a command line: {argv}");
    // Unset: named, before anything runs.
    let run = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "aaaa"])
        .run()
        .failure(2);
    assert!(
        run.all().contains("REG_PW, which is not set"),
        "{}",
        run.all()
    );
}

/// A host whose docker command does not exist: a clear error naming the host and the fix.
#[test]
fn host_without_docker_is_a_clear_error() {
    let host = Sshd::start();
    let dir = TempDir::new("dnodocker");
    let pb = pb(
        &dir,
        &[("nodocker", &host)],
        "    docker: { command: [\"/nonexistent/docker\"] }\n",
        "      - container: { name: never-created, image: \"busybox:none\" }\n",
    );
    let run = deploy(&[&host], &pb, "aaaa").failure(1);
    let all = run.all();
    assert!(
        all.contains("nodocker: docker command `/nonexistent/docker` not found on the host"),
        "{all}"
    );
    assert!(all.contains("docker: { command:"), "says how to fix: {all}");
}

/// A TCP health check on a port where nothing listens says so (not that SSH failed).
#[test]
fn a_closed_port_fails_the_tcp_health_check_clearly() {
    engine();
    let host = Sshd::start();
    let prefix = unique("closed");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = format!("{prefix}-img:1");
    app_image(&image, "c1", true);
    let closed = free_port();
    let dir = TempDir::new("dclosed");
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
         health: {{ type: tcp, address: \"127.0.0.1:{closed}\", timeout: 2s, interval: 500ms }}\n"
    );
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    let run = deploy(&[&host], &pb, "aaaa").failure(1);
    assert!(
        run.all().contains(&format!(
            "cannot reach 127.0.0.1:{closed} from the host: nothing accepts connections there"
        )),
        "{}",
        run.all()
    );
    assert!(
        !run.all().contains("ssh connection failed"),
        "{}",
        run.all()
    );
}

/// Docker's own HEALTHCHECK state and a TCP probe gate the start; `ferry stop` with
/// `docker_remove` removes the container and the one kept for rollback.
#[test]
fn docker_and_tcp_health_then_stop_removes_everything() {
    engine();
    let host = Sshd::start();
    let prefix = unique("kinds");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let plain = format!("{prefix}-img:1");
    app_image(&plain, "k1", true);
    // An image with a HEALTHCHECK, built FROM the imported one.
    let ctx = TempDir::new("hcctx");
    ctx.write(
        "Dockerfile",
        format!(
            "FROM {plain}\nHEALTHCHECK --interval=1s --timeout=5s --start-period=30s --retries=3 CMD wget -q -O /dev/null http://127.0.0.1:8080/health || exit 1\n"
        ),
    );
    let checked = format!("{prefix}-hc:1");
    docker(&["build", "-q", "-t", &checked, ctx.path().to_str().unwrap()]);
    let (pd, pt) = (free_port(), free_port());
    let dir = TempDir::new("dkinds");
    let steps = format!(
        "      - container:\n          name: \"{prefix}-d\"\n          image: \"{checked}\"\n          \
         ports: [\"127.0.0.1:{pd}:8080\"]\n          health: {{ type: docker, timeout: 30s }}\n\
         \x20     - container:\n          name: \"{prefix}-t\"\n          image: \"{plain}\"\n          \
         ports: [\"127.0.0.1:{pt}:8080\"]\n          \
         health: {{ type: tcp, address: \"127.0.0.1:{pt}\", timeout: 20s, interval: 200ms }}\n"
    );
    let on_stop = format!(
        "    on_stop:\n      - docker_remove: {{ name: \"{prefix}-d\" }}\n      - docker_remove: {{ name: \"{prefix}-t\" }}\n"
    );
    let pb = pb(&dir, &[("web1", &host)], &on_stop, &steps);
    let run = deploy(&[&host], &pb, "aaaa").success();
    assert!(
        run.all().contains("Docker reports healthy"),
        "{}",
        run.all()
    );
    assert!(
        run.all()
            .contains(&format!("127.0.0.1:{pt} accepts connections")),
        "{}",
        run.all()
    );
    assert_eq!(
        docker(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Health.Status}}",
            &format!("{prefix}-d")
        ]),
        "healthy"
    );
    // A second deploy with a changed spec keeps a rollback container, which stop must also remove.
    app_image(&plain, "k2", true);
    deploy(&[&host], &pb, "bbbb").success();
    assert!(docker_try(&["container", "inspect", &format!("{prefix}-t.ferry-prev")]).0);
    let stop = Ferry::new()
        .trusting(&[&host])
        .arg("stop")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "bbbb"])
        .run()
        .success();
    assert!(
        stop.all()
            .contains(&format!("removed {prefix}-t, {prefix}-t.ferry-prev")),
        "{}",
        stop.all()
    );
    for n in ["-d", "-t", "-t.ferry-prev"] {
        assert!(
            !docker_try(&["container", "inspect", &format!("{prefix}{n}")]).0,
            "{n}"
        );
    }
}

/// A BusyBox-only host (BusyBox sh, no coreutils on PATH) runs the whole container cycle: the
/// secret env file script, health over the SSH tunnel, an update that keeps a rollback copy, and
/// removal.
#[test]
fn busybox_host_runs_the_container_cycle() {
    busybox_docker_user();
    let host = Sshd::start_with(SshdOptions {
        busybox: true,
        ..Default::default()
    });
    let prefix = unique("bb");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = format!("{prefix}-img:1");
    app_image(&image, "bb1", true);
    let port = free_port();
    let dir = TempDir::new("dbb root with space");
    // The deploy user owns the environment's root, as on a real host.
    std::fs::create_dir_all(dir.join("root/bb")).unwrap();
    run_ok(
        std::process::Command::new("chown")
            .arg(BUSYBOX_USER)
            .arg(dir.join("root/bb")),
    );
    let step = |greeting: &str| {
        format!(
            "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
             env: {{ GREETING: \"{greeting}\" }}\n          secret_env: {{ TOKEN: BB_TOKEN }}\n          \
             ports: [\"127.0.0.1:{port}:8080\"]\n          \
             health: {{ type: http, url: \"http://127.0.0.1:{port}/health\", timeout: 20s, interval: 200ms }}\n"
        )
    };
    let env_docker = format!("    docker: {{ command: [\"{}\"] }}\n", docker_path());
    let on_stop = format!("    on_stop:\n      - docker_remove: {{ name: \"{prefix}\" }}\n");
    let run = |steps: &str, cmd: &str| {
        let pb = pb(
            &dir,
            &[("bb", &host)],
            &format!("{env_docker}{on_stop}"),
            steps,
        );
        Ferry::new()
            .trusting(&[&host])
            .arg(cmd)
            .arg(&pb)
            .args(["--env", "test", "--ref", "main", "--sha", "aaaa"])
            .env("BB_TOKEN", "bb-token-value")
            .run()
    };
    let first = run(&step("one"), "deploy").success();
    assert!(
        first.all().contains(&format!("created {prefix}")),
        "{}",
        first.all()
    );
    let env = docker(&[
        "container",
        "inspect",
        "--format",
        "{{json .Config.Env}}",
        &prefix,
    ]);
    assert!(env.contains("TOKEN=bb-token-value"), "{env}");
    assert!(!first.all().contains("bb-token-value"));
    let second = run(&step("two"), "deploy").success();
    assert!(second.all().contains("spec changed"), "{}", second.all());
    assert_eq!(http_get(port, "/version").as_deref(), Some("bb1\n"));
    assert!(docker_try(&["container", "inspect", &format!("{prefix}.ferry-prev")]).0);
    let secrets_dir = dir.join("root/bb/.ferry/docker");
    let left: Vec<_> = std::fs::read_dir(&secrets_dir).unwrap().collect();
    assert!(left.is_empty(), "env files left: {left:?}");
    run(&step("two"), "stop").success();
    assert!(!docker_try(&["container", "inspect", &prefix]).0);
    assert!(!docker_try(&["container", "inspect", &format!("{prefix}.ferry-prev")]).0);
}

/// A registry image that cannot be pulled fails the step with the registry's answer, even when a
/// stale local copy exists: deploying that copy as "up to date" would hide the problem.
#[test]
fn unpullable_registry_image_is_an_error() {
    engine();
    let host = Sshd::start();
    let prefix = unique("ghost");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = format!("{REGISTRY}/{prefix}/never-pushed:1");
    app_image(&image, "stale", true);
    let dir = TempDir::new("dghost");
    let steps = format!("      - container: {{ name: \"{prefix}\", image: \"{image}\" }}\n");
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    let run = deploy(&[&host], &pb, "aaaa").failure(1);
    assert!(
        run.all().contains(&format!("cannot pull {image}")),
        "{}",
        run.all()
    );
    assert!(!docker_try(&["container", "inspect", &prefix]).0);
}

/// A deploy killed after moving the old container aside leaves `NAME.ferry-aside` and no NAME: the
/// next run puts it back (and, the spec being the same, has nothing else to do).
#[test]
fn interrupted_deploy_is_recovered() {
    engine();
    let host = Sshd::start();
    let prefix = unique("crash");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let image = format!("{prefix}-img:1");
    app_image(&image, "c1", true);
    let port = free_port();
    let dir = TempDir::new("dcrash");
    let steps = |env: &str| {
        format!(
            "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
             restart: always\n          env: {{ V: \"{env}\" }}\n          \
             ports: [\"127.0.0.1:{port}:8080\"]\n          \
             health: {{ type: http, url: \"http://127.0.0.1:{port}/health\", timeout: 20s, interval: 200ms }}\n"
        )
    };
    let pb = pb(&dir, &[("web1", &host)], "", &steps("1"));
    deploy(&[&host], &pb, "aaaa").success();
    let id = container_id(&prefix);
    // What a kill between "move aside" and "start the new one" leaves behind.
    docker(&["rename", &prefix, &format!("{prefix}.ferry-aside")]);
    docker(&["stop", &format!("{prefix}.ferry-aside")]);
    let run = deploy(&[&host], &pb, "aaaa").success();
    assert!(
        run.all()
            .contains(&format!("restored {prefix} from {prefix}.ferry-aside")),
        "{}",
        run.all()
    );
    assert!(run.all().contains("up to date"), "{}", run.all());
    assert_eq!(container_id(&prefix), id);
    assert_eq!(http_get(port, "/version").as_deref(), Some("c1\n"));
    let restart = |name: &str| {
        docker(&[
            "container",
            "inspect",
            "--format",
            "{{.HostConfig.RestartPolicy.Name}}",
            name,
        ])
    };
    assert_eq!(restart(&prefix), "always");

    // Killed after starting the new container, before its health check ended: the one that was
    // live comes back, and the new one (never found healthy) goes.
    let bad = format!("{prefix}-img:bad");
    app_image(&bad, "c2", false);
    docker(&["rename", &prefix, &format!("{prefix}.ferry-aside")]);
    docker(&["stop", &format!("{prefix}.ferry-aside")]);
    docker(&[
        "run",
        "-d",
        "--name",
        &prefix,
        "--label",
        "ferry.sha=cccccccc",
        &bad,
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    // Until then, `ferry status` says what the cut run left.
    let status = Ferry::new()
        .trusting(&[&host])
        .args(["status", "--env", "test"])
        .arg(&pb)
        .run()
        .success();
    for note in [
        format!("container {prefix}.ferry-aside is there: a replace of {prefix} was cut off"),
        "drift: the host runs commit cccccccc".to_string(),
    ] {
        assert!(status.stdout.contains(&note), "{note}: {}", status.all());
    }
    // And a plan says the run would put it back.
    let plan = Ferry::new()
        .trusting(&[&host])
        .args([
            "deploy", "--plan", "--env", "test", "--ref", "main", "--sha", "aaaa",
        ])
        .arg(&pb)
        .run()
        .success();
    assert!(
        plan.stdout.contains(&format!(
            "would restore {prefix} from {prefix}.ferry-aside (left by an interrupted deploy"
        )),
        "{}",
        plan.all()
    );
    let run = deploy(&[&host], &pb, "aaaa").success();
    assert!(
        run.all()
            .contains(&format!("removed {prefix}, which an interrupted deploy")),
        "{}",
        run.all()
    );
    assert!(run.all().contains("up to date"), "{}", run.all());
    assert_eq!(container_id(&prefix), id);
    assert_eq!(restart(&prefix), "always");

    // An update keeps the old container without its restart policy (a restart of docker would
    // start it beside the live one); a rollback gives it back.
    let pb = crate::docker::pb(&dir, &[("web1", &host)], "", &steps("2"));
    deploy(&[&host], &pb, "bbbb").success();
    let prev = format!("{prefix}.ferry-prev");
    assert_eq!(container_id(&prev), id);
    assert_eq!(
        (restart(&prefix).as_str(), restart(&prev).as_str()),
        ("always", "no")
    );
    Ferry::new()
        .trusting(&[&host])
        .arg("rollback")
        .arg(&pb)
        .args(["--env", "test"])
        .run()
        .success();
    assert_eq!(container_id(&prefix), id);
    assert_eq!(
        (restart(&prefix).as_str(), restart(&prev).as_str()),
        ("always", "no")
    );
}

/// Steps: `dist/` to `site`, then the service container `prefix` from `$APP_IMAGE`, health-checked
/// over HTTP on `port`.
fn bundle_and_app(dir: &TempDir, prefix: &str, port: u16) -> String {
    format!(
        "      - sync: {{ from: \"{src}\", to: site }}\n      - container:\n          \
         name: \"{prefix}\"\n          image: \"${{env.APP_IMAGE}}\"\n          \
         ports: [\"127.0.0.1:{port}:8080\"]\n          \
         health: {{ type: http, url: \"http://127.0.0.1:{port}/health\", timeout: 20s, interval: 200ms }}\n",
        src = dir.join("dist").display()
    )
}

/// `ferry CMD` of commit `n` (`bundle n` in `dist/index.html`) with `$APP_IMAGE` set to `image`.
fn bundle_run(
    dir: &TempDir,
    host: &Sshd,
    pb: &std::path::Path,
    cmd: &str,
    n: u32,
    image: &str,
) -> Ferry {
    dir.write("dist/index.html", format!("bundle {n}\n"));
    Ferry::new()
        .trusting(&[host])
        .arg(cmd)
        .arg(pb)
        .args([
            "--env",
            "test",
            "--ref",
            "main",
            "--sha",
            &format!("{n:040}"),
        ])
        .env("APP_IMAGE", image)
}

/// A rollback whose container step fails (the kept container was removed by hand) puts the files
/// it had switched back where they were, so the bundle still matches the container that runs.
#[test]
fn a_failed_rollback_switches_the_files_back() {
    engine();
    let host = Sshd::start();
    let prefix = unique("rbfail");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let port = free_port();
    let dir = TempDir::new("rbfail");
    let pb = pb(
        &dir,
        &[("web1", &host)],
        "",
        &bundle_and_app(&dir, &prefix, port),
    );
    let run = |cmd: &str, n: u32, image: &str| bundle_run(&dir, &host, &pb, cmd, n, image).run();
    let (one, two) = (
        pushed_image(&prefix, "one", "app one", true),
        pushed_image(&prefix, "two", "app two", true),
    );
    run("deploy", 1, &one).success();
    run("deploy", 2, &two).success();
    let site = dir.join("root/web1/site/index.html");
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "bundle 2\n");
    docker(&["rm", "-f", &format!("{prefix}.ferry-prev")]);

    let failed = run("rollback", 2, &two).failure(1);
    assert!(
        failed.all().contains("switched back to release")
            && failed.all().contains("rollback failed"),
        "{}",
        failed.all()
    );
    assert_eq!(
        std::fs::read_to_string(&site).unwrap(),
        "bundle 2\n",
        "the files went back with the container"
    );
    assert_eq!(http_get(port, "/version").as_deref(), Some("app two\n"));
}

/// A deploy killed in its health wait left its files live, its new container running and the old
/// one aside, and nothing recorded; its retry, failing the same health check, takes over the
/// lock: it puts the host back on the last good run first, so that the files it switches back to
/// match the container that goes back.
#[test]
fn a_retry_after_a_killed_deploy_leaves_files_and_container_together() {
    engine();
    let host = Sshd::start();
    let prefix = unique("retry");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let port = free_port();
    let dir = TempDir::new("retry");
    let pb = pb(
        &dir,
        &[("web1", &host)],
        "",
        &bundle_and_app(&dir, &prefix, port),
    );
    let run = |n: u32, image: &str| bundle_run(&dir, &host, &pb, "deploy", n, image).run();
    let (one, two) = (
        pushed_image(&prefix, "one", "app one", true),
        pushed_image(&prefix, "two", "app two", true),
    );
    let bad = pushed_image(&prefix, "bad", "app bad", false);
    run(1, &one).success();
    // What the killed run of commit 2 leaves: its files and container, the old one aside, no
    // record, and its lock, expired.
    run(2, &two).success();
    docker(&[
        "rename",
        &format!("{prefix}.ferry-prev"),
        &format!("{prefix}.ferry-aside"),
    ]);
    let state = dir.join("root/web1/.ferry");
    let records = std::fs::read_to_string(state.join("ledger.jsonl")).unwrap();
    std::fs::write(
        state.join("ledger.jsonl"),
        format!("{}\n", records.lines().next().unwrap()),
    )
    .unwrap();
    let lock = state.join("locks/testapp-test");
    std::fs::create_dir_all(&lock).unwrap();
    std::fs::write(lock.join("token"), "dead\n").unwrap();
    std::fs::write(
        lock.join("holder.json"),
        "{\"token\":\"dead\",\"ref\":\"main\",\"sha\":\"2\",\"pipeline_id\":null,\"job_url\":null,\"user\":\"bob\",\"controller\":\"gone\",\"pid\":1,\"started_at\":1}\n",
    )
    .unwrap();
    std::fs::write(lock.join("expires"), "1\n").unwrap();
    let site = dir.join("root/web1/site/index.html");
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "bundle 2\n");

    let retry = run(2, &bad).failure(1);
    assert!(
        retry.all().contains("putting the host back on release"),
        "{}",
        retry.all()
    );
    assert_eq!(http_get(port, "/version").as_deref(), Some("app one\n"));
    assert_eq!(
        std::fs::read_to_string(&site).unwrap(),
        "bundle 1\n",
        "the files went back with the container: {}",
        retry.all()
    );
}

/// A step after the service container's switch fails: the container goes back to the one it
/// replaced, then the files, so the host runs what it ran before the deploy.
#[test]
fn a_failure_after_the_container_switch_takes_container_and_files_back() {
    engine();
    let host = Sshd::start();
    let prefix = unique("after");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    let port = free_port();
    let dir = TempDir::new("after");
    let steps = format!(
        "{}      - run: {{ command: [sh, -c, \"test \\\"$0\\\" != fail\", \"${{env.SMOKE}}\"] }}\n",
        bundle_and_app(&dir, &prefix, port)
    );
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    let run = |n: u32, image: &str, smoke: &str| {
        bundle_run(&dir, &host, &pb, "deploy", n, image)
            .env("SMOKE", smoke)
            .run()
    };
    let (one, two) = (
        pushed_image(&prefix, "one", "app one", true),
        pushed_image(&prefix, "two", "app two", true),
    );
    run(1, &one, "ok").success();
    let site = dir.join("root/web1/site/index.html");
    // A run that only starts the stopped container switched none: its files go back all the same.
    docker(&["stop", &prefix]);
    run(2, &one, "fail").failure(1);
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "bundle 1\n");
    assert_eq!(http_get(port, "/version").as_deref(), Some("app one\n"));
    let failed = run(2, &two, "fail").failure(1);
    let all = failed.all();
    assert!(
        all.contains(&format!("switched {prefix} back"))
            && all.contains("sync: switched back to release"),
        "{all}"
    );
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "bundle 1\n");
    assert_eq!(http_get(port, "/version").as_deref(), Some("app one\n"));
    // The next deploy of the fixed commit goes ahead from there.
    run(2, &two, "ok").success();
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "bundle 2\n");
    assert_eq!(http_get(port, "/version").as_deref(), Some("app two\n"));
    let (prev, older) = (
        format!("{prefix}.ferry-prev"),
        format!("{prefix}.ferry-older"),
    );
    let (two_id, one_id) = (container_id(&prefix), container_id(&prev));
    // A third commit fails after its switch: the second container is back, the first is still the
    // one kept for rollback (not the failed third), so `ferry rollback` still reaches it.
    let three = pushed_image(&prefix, "three", "app three", true);
    run(3, &three, "fail").failure(1);
    assert_eq!(
        (container_id(&prefix), container_id(&prev)),
        (two_id.clone(), one_id.clone())
    );
    assert!(!docker_try(&["container", "inspect", &older]).0);
    assert_eq!(http_get(port, "/version").as_deref(), Some("app two\n"));
    bundle_run(&dir, &host, &pb, "rollback", 3, &three)
        .run()
        .success();
    assert_eq!(http_get(port, "/version").as_deref(), Some("app one\n"));
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "bundle 1\n");
    assert_eq!(
        (container_id(&prefix), container_id(&prev)),
        (one_id.clone(), two_id)
    );
    // A successful update keeps no container beyond the one for rollback.
    run(4, &three, "ok").success();
    assert_eq!(container_id(&prev), one_id);
    assert!(!docker_try(&["container", "inspect", &older]).0);
    assert_eq!(http_get(port, "/version").as_deref(), Some("app three\n"));
}

/// Two service containers: the second fails its health check on the new release, so it is put
/// back by its own step, and the run takes the first container and the files back with it.
#[test]
fn a_failed_second_container_takes_the_first_back() {
    engine();
    let host = Sshd::start();
    let prefix = unique("pair");
    let worker = format!("{prefix}-worker");
    let _cleanup = Cleanup(vec![prefix.clone(), worker.clone()]);
    let (port, worker_port) = (free_port(), free_port());
    let dir = TempDir::new("pair");
    let steps = format!(
        "{}      - container:\n          name: \"{worker}\"\n          \
         image: \"${{env.WORKER_IMAGE}}\"\n          ports: [\"127.0.0.1:{worker_port}:8080\"]\n          \
         health: {{ type: http, url: \"http://127.0.0.1:{worker_port}/health\", timeout: 8s, interval: 200ms }}\n",
        bundle_and_app(&dir, &prefix, port)
    );
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    let run = |n: u32, image: &str, worker_image: &str| {
        bundle_run(&dir, &host, &pb, "deploy", n, image)
            .env("WORKER_IMAGE", worker_image)
            .run()
    };
    let (one, two) = (
        pushed_image(&prefix, "one", "app one", true),
        pushed_image(&prefix, "two", "app two", true),
    );
    let (w_one, w_sick) = (
        pushed_image(&worker, "one", "worker one", true),
        pushed_image(&worker, "sick", "worker sick", false),
    );
    run(1, &one, &w_one).success();
    let failed = run(2, &two, &w_sick).failure(1);
    let all = failed.all();
    assert!(all.contains(&format!("switched {prefix} back")), "{all}");
    assert_eq!(
        std::fs::read_to_string(dir.join("root/web1/site/index.html")).unwrap(),
        "bundle 1\n"
    );
    assert_eq!(http_get(port, "/version").as_deref(), Some("app one\n"));
    assert_eq!(
        http_get(worker_port, "/version").as_deref(),
        Some("worker one\n")
    );
}

/// Ctrl-C while the image is being pulled stops the step at once (nothing was switched yet),
/// where before the step ran on until the pull gave up.
#[test]
fn ctrl_c_during_a_pull_stops_the_container_step() {
    engine();
    let host = Sshd::start();
    let prefix = unique("pullint");
    let _cleanup = Cleanup(vec![prefix.clone()]);
    // A registry that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let dir = TempDir::new("pullint");
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"127.0.0.1:{port}/app:1\"\n"
    );
    let pb = pb(&dir, &[("web1", &host)], "", &steps);
    let (child, _home) = Ferry::new()
        .trusting(&[&host])
        .arg("deploy")
        .arg(&pb)
        .args(["--env", "test", "--ref", "main", "--sha", "aaaa"])
        .spawn();
    // The step is pulling once Docker connects to the registry (the connection is held open).
    silent.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let _held = loop {
        match silent.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < deadline, "no pull began");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let sent = std::time::Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(8),
        "took {:?}: {stderr}",
        sent.elapsed()
    );
    assert!(stderr.contains("while pulling"), "{stderr}");
    assert!(!docker_try(&["container", "inspect", &prefix]).0);
    drop(silent);
}

/// A container step mid-switch, for tests that cut it off: `prefix` ran a healthy `v1` image
/// (container `old`), and a deploy of one that never gets healthy (`child`, its health check
/// waiting up to 60 s) has moved it aside as `aside`.
struct HealthWait {
    host: Sshd,
    dir: TempDir,
    prefix: String,
    port: u16,
    good: String,
    aside: String,
    old: String,
    child: std::process::Child,
    _home: TempDir,
    _cleanup: Cleanup,
}

impl HealthWait {
    fn start(tag: &str) -> HealthWait {
        engine();
        let host = Sshd::start();
        let prefix = unique(tag);
        let cleanup = Cleanup(vec![prefix.clone()]);
        let port = free_port();
        let good = pushed_image(&prefix, "good", "v1", true);
        let bad = pushed_image(&prefix, "bad", "v2", false);
        let dir = TempDir::new(tag);
        let w = |image: &str| health_wait_pb(&dir, &host, &prefix, port, image);
        deploy(&[&host], &w(&good), "aaaa").success();
        let old = container_id(&prefix);
        let (child, home) = Ferry::new()
            .trusting(&[&host])
            .arg("deploy")
            .arg(w(&bad))
            .args(["--env", "test", "--ref", "main", "--sha", "bbbb"])
            .spawn();
        // The switch has begun once the old container is moved aside.
        let aside = format!("{prefix}.ferry-aside");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !docker_try(&["container", "inspect", &aside]).0 {
            assert!(std::time::Instant::now() < deadline, "no switch began");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        HealthWait {
            host,
            dir,
            prefix,
            port,
            good,
            aside,
            old,
            child,
            _home: home,
            _cleanup: cleanup,
        }
    }
}

/// The playbook of [`HealthWait`]: container `prefix` of `image` on `port`, health-checked.
fn health_wait_pb(
    dir: &TempDir,
    host: &Sshd,
    prefix: &str,
    port: u16,
    image: &str,
) -> std::path::PathBuf {
    let steps = format!(
        "      - container:\n          name: \"{prefix}\"\n          image: \"{image}\"\n          \
         ports: [\"127.0.0.1:{port}:8080\"]\n          \
         health: {{ type: http, url: \"http://127.0.0.1:{port}/health\", timeout: 60s, interval: 200ms }}\n"
    );
    pb(dir, &[("web1", host)], "", &steps)
}

/// A cancelled job (SIGTERM; GitLab sends SIGKILL seconds later) while the new container's health
/// check waits: the old container is back at once, not after the check's timeout.
#[test]
fn sigterm_during_a_health_wait_puts_the_old_container_back() {
    let w = HealthWait::start("healthint");
    let (prefix, port, aside, old, child) = (&w.prefix, w.port, &w.aside, &w.old, w.child);
    let sent = std::time::Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}: {stderr}",
        sent.elapsed()
    );
    assert!(
        stderr.contains("interrupted (SIGINT/SIGTERM) while waiting for it to be healthy"),
        "{stderr}"
    );
    assert_eq!(&container_id(prefix), old);
    assert_eq!(container_state(prefix), "running");
    assert_eq!(http_get(port, "/version").as_deref(), Some("v1\n"));
    assert!(!docker_try(&["container", "inspect", aside]).0);
}

/// The connection lost while the new container's health check waits: ferry says so, and claims
/// no removal it could not make; the next deploy brings back the container that was live.
#[test]
fn a_connection_lost_during_a_health_wait_is_said_as_such() {
    let w = HealthWait::start("healthcut");
    let (host, prefix, port, child) = (&w.host, &w.prefix, w.port, w.child);
    for pid in pids_of_children(host.pid()) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("the connection was lost while the new container")
            && !all.contains("was removed"),
        "{all}"
    );
    // The next deploy (the good image again; the lost run's lock removed) brings the old
    // container back.
    let first = health_wait_pb(&w.dir, host, prefix, port, &w.good);
    Ferry::new()
        .trusting(&[host])
        .arg("unlock")
        .arg(&first)
        .args(["--env", "test", "--force"])
        .run()
        .success();
    let run = deploy(&[host], &first, "aaaa").success();
    assert!(
        run.all().contains(&format!("restored {prefix}")),
        "{}",
        run.all()
    );
    assert_eq!(&container_id(prefix), &w.old);
    assert_eq!(http_get(port, "/version").as_deref(), Some("v1\n"));
}
