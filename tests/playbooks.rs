//! The shipped playbooks in playbooks/: each loads, and each job runs end to end the way GitLab CI
//! runs it (CI variables, SSH_PRIVATE_KEY in the environment, strict host keys) against real sshd
//! hosts, the real Docker engine and the real registry. Afterwards `ferry status` tells the story.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::support::docker::*;
use crate::support::*;

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("playbooks")
        .join(name)
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench/make_corpus.py")
}

fn sha(n: u32) -> String {
    format!("{n:08x}").repeat(5)
}

/// The publish and release jobs share the `shop` repository: run them one at a time.
static SHOP_REPOSITORY: Mutex<()> = Mutex::new(());

/// Every regular file and symlink under `dir`: relative path → content (or `-> target`).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                walk(base, &p, out);
            } else if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    // read_dir follows `dir` itself (the live symlink); nothing inside is followed.
    walk(dir, dir, &mut out);
    out
}

fn without_maps(t: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    t.iter()
        .filter(|(k, _)| !k.ends_with(".map"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn every_shipped_playbook_loads_and_routes_refs() {
    // `check` with a bogus env lists the environments without connecting: the playbook must load.
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
        .env("CI_COMMIT_SHA", sha(1))
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

/// Job 2: `npm run build` output goes to two web paths on two hosts; the next build changes 5% of
/// the files; status shows both hosts on the new commit; rollback puts the first build back.
#[test]
fn frontend_dist_job_end_to_end() {
    let opts = SshdOptions {
        private_dirs: vec!["/var/www", "/srv"],
        ..Default::default()
    };
    let (web1, web2) = (Sshd::start_with(opts.clone()), Sshd::start_with(opts));
    let work = TempDir::new("frontend");
    run_ok(
        Command::new("python3")
            .arg(corpus())
            .arg(work.join("dist"))
            .args(["--files", "300", "--mb", "4", "--seed", "7"]),
    );
    let build1 = tree(&work.join("dist"));
    assert!(
        build1.keys().any(|k| k.ends_with(".map")),
        "corpus has maps"
    );
    let job = |sha: &str, pipeline: &str| {
        Ferry::new()
            .trusting(&[&web1, &web2])
            .env("GITLAB_CI", "true")
            .env("CI_COMMIT_REF_NAME", "main")
            .env("CI_COMMIT_SHA", sha)
            .env("CI_PIPELINE_ID", pipeline)
            .env("FRONTEND_WEB1", web1.address())
            .env("FRONTEND_WEB2", web2.address())
            .current_dir(work.path())
    };
    let pb = shipped("frontend-dist.yml");

    let first = job(&sha(1), "101").arg("deploy").arg(&pb).run().success();
    for web in [&web1, &web2] {
        assert_eq!(
            tree(&web.fs("/var/www/shop")),
            without_maps(&build1),
            "site: {}",
            first.stdout
        );
        assert_eq!(tree(&web.fs("/var/www/shop-origin")), build1, "origin");
        assert!(
            std::fs::symlink_metadata(web.fs("/var/www/shop"))
                .unwrap()
                .file_type()
                .is_symlink(),
            "the served path is a symlink to a release"
        );
    }

    run_ok(
        Command::new("python3")
            .arg(corpus())
            .arg(work.join("dist"))
            .args(["--mutate", "5", "--seed", "8"]),
    );
    let build2 = tree(&work.join("dist"));
    let plan = job(&sha(2), "102")
        .args(["deploy", "--plan", "--json"])
        .arg(&pb)
        .run()
        .success();
    assert_eq!(
        tree(&web1.fs("/var/www/shop")),
        without_maps(&build1),
        "plan changes nothing"
    );
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).expect(&plan.stdout);
    assert_eq!(plan.as_array().unwrap().len(), 2, "{plan}");

    let second = job(&sha(2), "102")
        .args(["deploy", "--json"])
        .arg(&pb)
        .run()
        .success();
    let report: serde_json::Value = serde_json::from_str(&second.stdout).expect(&second.stdout);
    let total: u64 = build2.values().map(|v| v.len() as u64).sum();
    for host in report.as_array().unwrap() {
        let sent: u64 = host["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["bytes_sent"].as_u64().unwrap())
            .sum();
        assert!(
            sent > 0 && sent < total / 4,
            "a 5% change sends little: {sent} of {total}"
        );
    }
    for web in [&web1, &web2] {
        assert_eq!(tree(&web.fs("/var/www/shop")), without_maps(&build2));
        assert_eq!(tree(&web.fs("/var/www/shop-origin")), build2);
    }

    let status = job(&sha(2), "102").arg("status").arg(&pb).run().success();
    assert!(status.stdout.contains("main"), "{}", status.stdout);
    for web in [&web1, &web2] {
        let line = status
            .stdout
            .lines()
            .find(|l| l.contains(&web.address()))
            .unwrap_or_else(|| panic!("{}", status.stdout));
        assert!(line.contains(&sha(2)[..8]), "{line}");
    }

    job(&sha(2), "102")
        .args(["rollback", "--env", "production"])
        .arg(&pb)
        .run()
        .success();
    for web in [&web1, &web2] {
        assert_eq!(tree(&web.fs("/var/www/shop")), without_maps(&build1));
        assert_eq!(tree(&web.fs("/var/www/shop-origin")), build1);
    }
    let status = job(&sha(2), "102")
        .args(["status", "--json"])
        .arg(&pb)
        .run()
        .success();
    assert!(
        status.stdout.contains(&sha(1)),
        "rolled back: {}",
        status.stdout
    );

    // The targets of one deploy can hold different releases: a build that changes only source
    // maps leaves the site's release as it was. Rolling back to such a deploy puts each back.
    let dist = work.join("dist");
    let map = build2.keys().find(|k| k.ends_with(".map")).unwrap().clone();
    let touch_map = |extra: &str| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dist.join(&map))
            .unwrap();
        std::io::Write::write_all(&mut f, extra.as_bytes()).unwrap();
    };
    touch_map("// 3");
    job(&sha(3), "103").arg("deploy").arg(&pb).run().success();
    touch_map("// 4");
    let build4 = tree(&dist);
    let maps_only = job(&sha(4), "104").arg("deploy").arg(&pb).run().success();
    assert!(
        maps_only.stderr.contains("unchanged"),
        "{}",
        maps_only.stderr
    );
    run_ok(
        Command::new("python3")
            .arg(corpus())
            .arg(&dist)
            .args(["--mutate", "5", "--seed", "9"]),
    );
    job(&sha(5), "105").arg("deploy").arg(&pb).run().success();
    job(&sha(5), "105")
        .args(["rollback", "--env", "production"])
        .arg(&pb)
        .run()
        .success();
    for web in [&web1, &web2] {
        assert_eq!(tree(&web.fs("/var/www/shop")), without_maps(&build4));
        assert_eq!(tree(&web.fs("/var/www/shop-origin")), build4);
    }
}

/// Job 3: a tag builds the image on the build host from the synced context, pins it to
/// `shop:<tag>` in the registry, and a second tag does not overwrite the first.
#[test]
fn tag_publish_job_end_to_end() {
    let _shop = SHOP_REPOSITORY.lock().unwrap_or_else(|e| e.into_inner());
    engine();
    let build = Sshd::start();
    let work = TempDir::new("publish");
    let base = unique("publish-base");
    app_image(&base, "base", true);
    let job = |tag: &str, pipeline: &str, content: &str| {
        work.write(
            "docker/Dockerfile",
            format!("FROM {base}\nCOPY release.txt /www/version\n"),
        );
        work.write("docker/release.txt", format!("{content}\n"));
        Ferry::new()
            .trusting(&[&build])
            .env("GITLAB_CI", "true")
            .env("CI_COMMIT_TAG", tag)
            .env("CI_COMMIT_REF_NAME", tag)
            .env("CI_COMMIT_SHA", sha(pipeline.parse().unwrap()))
            .env("CI_PIPELINE_ID", pipeline)
            .env("BUILD_HOST", build.address())
            .env("BUILD_ROOT", work.join("build"))
            .env("REGISTRY", REGISTRY)
            .env("REGISTRY_USER", REGISTRY_USER)
            .env("REGISTRY_PASSWORD", REGISTRY_PASSWORD)
            .current_dir(work.path())
            .arg("deploy")
            .arg(shipped("tag-publish.yml"))
            .run()
    };
    let repo = format!("{REGISTRY}/shop");
    // Tags of this run only: the registry keeps what earlier runs published, and a published
    // tag is not replaced.
    let run_id = unique("run");
    let tags = [format!("v1.0.0-{run_id}"), format!("v1.1.0-{run_id}")];
    for (tag, pipeline) in [(tags[0].as_str(), "201"), (tags[1].as_str(), "202")] {
        let run = job(tag, pipeline, tag).success();
        assert!(!run.all().contains(REGISTRY_PASSWORD), "password leaked");
        // Gone from the engine, then pulled back from the registry: it was pushed.
        let image = format!("{repo}:{tag}");
        docker_try(&["rmi", &image]);
        let (ok, out) = docker_try(&["pull", &image]);
        assert!(ok, "pull {image}: {out}");
    }
    for tag in &tags {
        let out = docker(&[
            "run",
            "--rm",
            &format!("{repo}:{tag}"),
            "cat",
            "/www/version",
        ]);
        assert_eq!(&out, tag, "the tag's image holds the tag's build");
    }
    // A rerun of a tag's pipeline that builds the same image has nothing to push; one that
    // builds another does not replace what the tag published.
    let same = job(&tags[0], "203", &tags[0]).success();
    assert!(
        same.all().contains("is in the registry already"),
        "{}",
        same.all()
    );
    let rerun = job(&tags[0], "204", "rebuilt").failure(1);
    assert!(
        rerun.all().contains("the registry already has"),
        "{}",
        rerun.all()
    );
    // A tag published as a manifest list without this host's platform, which a pull here fails
    // to get, is not replaced either.
    let foreign = format!("v2.0.0-{run_id}");
    let arm = format!("{repo}:arm-{run_id}");
    docker(&["tag", &base, &arm]);
    docker(&["push", "-q", &arm]);
    let list = format!("{repo}:{foreign}");
    for args in [
        vec!["create", "--insecure", &list, &arm],
        vec!["annotate", "--arch", "arm64", &list, &arm],
        vec!["push", "--purge", "--insecure", &list],
    ] {
        let out = std::process::Command::new("docker")
            .env("DOCKER_CLI_EXPERIMENTAL", "enabled")
            .arg("manifest")
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "docker manifest {args:?}: {out:?}");
    }
    let (pulled, out) = docker_try(&["pull", &list]);
    assert!(!pulled && out.contains("no matching manifest"), "{out}");
    let refused = job(&foreign, "205", "foreign").failure(1);
    assert!(
        refused
            .all()
            .contains("for other platforms than this host's"),
        "{}",
        refused.all()
    );
    assert!(!refused.all().contains("pushed"), "{}", refused.all());
    let (pulled, out) = docker_try(&["pull", &list]);
    assert!(
        !pulled && out.contains("no matching manifest"),
        "the list is still there: {out}"
    );
    let first = format!("{repo}:{}", tags[0]);
    docker_try(&["rmi", &first]);
    let (ok, out) = docker_try(&["pull", &first]);
    assert!(ok, "pull {first}: {out}");
    let out = docker(&["run", "--rm", &first, "cat", "/www/version"]);
    assert_eq!(out, tags[0], "the registry still has the first build");
    let status = Ferry::new()
        .trusting(&[&build])
        .env("BUILD_HOST", build.address())
        .env("BUILD_ROOT", work.join("build"))
        .arg("status")
        .arg(shipped("tag-publish.yml"))
        .run()
        .success();
    assert!(status.stdout.contains(&tags[1]), "{}", status.stdout);
}

/// Job 1: a push to `release-*` ships the backend bundle and runs the app with its MySQL and Redis
/// accessories, health-gated; a broken image is rolled back automatically; `ferry rollback` goes
/// back a commit.
#[test]
fn release_branch_deploy_job_end_to_end() {
    let _shop = SHOP_REPOSITORY.lock().unwrap_or_else(|e| e.into_inner());
    engine();
    let _cleanup = Cleanup(vec![
        "shop-app".into(),
        "shop-mysql".into(),
        "shop-redis".into(),
    ]);
    remove_containers("shop-");
    let staging = Sshd::start();
    let work = TempDir::new("release");
    let mysql = unique("mysql");
    let redis = unique("redis");
    app_image(&mysql, "mysql stand-in", true);
    app_image(&redis, "redis stand-in", true);
    let port = free_port();
    let job = |n: u32| {
        Ferry::new()
            .trusting(&[&staging])
            .env("GITLAB_CI", "true")
            .env("CI_COMMIT_REF_NAME", "release-1.4")
            .env("CI_COMMIT_SHA", sha(n))
            .env("CI_PIPELINE_ID", format!("30{n}"))
            .env("STAGING_HOST", staging.address())
            .env("STAGING_ROOT", work.join("staging"))
            .env("STAGING_URL_HOST", "127.0.0.1")
            .env("BUNDLE_DIR", work.join("backend"))
            .env("APP_PORT", port.to_string())
            .env("REGISTRY", REGISTRY)
            .env("REGISTRY_USER", REGISTRY_USER)
            .env("REGISTRY_PASSWORD", REGISTRY_PASSWORD)
            .env("DB_PASSWORD", "s3cret-db-pass")
            .env("MYSQL_IMAGE", &mysql)
            .env("REDIS_IMAGE", &redis)
            .current_dir(work.path())
    };
    let pb = shipped("release-deploy.yml");
    let app_tag = |n: u32| format!("release-1-4-{}", &sha(n)[..8]);
    // Each commit's bundle says which commit it is.
    let deploy = |n: u32| {
        work.write("backend/templates/index.html", format!("commit {n}\n"));
        job(n).arg("deploy").arg(&pb).run()
    };
    let bundle = || std::fs::read_to_string(work.join("staging/app/templates/index.html")).unwrap();

    pushed_image("shop", &app_tag(1), "app one", true);
    let run = deploy(1).success();
    assert!(!run.all().contains("s3cret-db-pass"), "secret leaked");
    assert_eq!(http_get(port, "/version").as_deref(), Some("app one\n"));
    assert_eq!(bundle(), "commit 1\n");
    let mysql_id = docker(&["inspect", "--format", "{{.Id}}", "shop-mysql"]);
    let env = docker(&["inspect", "--format", "{{json .Config.Env}}", "shop-app"]);
    assert!(
        env.contains("DB_PASSWORD=s3cret-db-pass"),
        "secret env reached the app"
    );

    let again = deploy(1).success();
    assert!(
        again.all().contains("unchanged") || again.all().contains("up to date"),
        "the same commit again is a no-op: {}",
        again.all()
    );

    pushed_image("shop", &app_tag(2), "app two", true);
    deploy(2).success();
    assert_eq!(http_get(port, "/version").as_deref(), Some("app two\n"));
    assert_eq!(
        docker(&["inspect", "--format", "{{.Id}}", "shop-mysql"]),
        mysql_id,
        "accessories are left alone on app deploys"
    );

    pushed_image("shop", &app_tag(3), "app three", false);
    let broken = deploy(3).failure(1);
    assert!(broken.all().contains("health"), "{}", broken.all());
    assert_eq!(
        http_get(port, "/version").as_deref(),
        Some("app two\n"),
        "the old container serves again"
    );
    assert_eq!(bundle(), "commit 2\n", "and the old bundle beside it");

    job(3)
        .args(["rollback", "--env", "staging"])
        .arg(&pb)
        .run()
        .success();
    assert_eq!(http_get(port, "/version").as_deref(), Some("app one\n"));
    assert_eq!(
        bundle(),
        "commit 1\n",
        "rollback takes files and containers back together"
    );

    let status = job(3).arg("status").arg(&pb).run().success();
    assert!(status.stdout.contains("release-1.4"), "{}", status.stdout);
    let history = job(3).arg("history").arg(&pb).run().success();
    for action in ["deploy", "rollback"] {
        assert!(history.stdout.contains(action), "{}", history.stdout);
    }
}
