#!/usr/bin/env bash
# Run ferry's jobs the way GitLab CI would, against local test hosts this script starts itself:
# two web hosts (real sshd on loopback ports) for the frontend dist push, then the release-branch
# deploy and the tag-triggered image publish against a local Docker engine and registry.
# Needs root on Debian (it installs packages with apt-get). Leaves the hosts running; stop them with
#   bash tests/env/demo.sh stop
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
export FERRY_HOSTS_DIR=${FERRY_HOSTS_DIR:-/tmp/ferry-demo}
. tests/env/hosts.sh
if [ "${1:-}" = stop ]; then stop_hosts; exit 0; fi

bash tests/env/install.sh
# (Rust from rustup, if install.sh just put it there.)
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
cargo build --release --locked 2>&1 | tail -n 1
ferry=$repo/target/release/ferry
section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

section "starting two web hosts (sshd on loopback, each with its own /var/www and /srv)"
web1=$(start_sshd web1 /var/www /srv)
web2=$(start_sshd web2 /var/www /srv)
echo "web1: 127.0.0.1:$web1   web2: 127.0.0.1:$web2"

# What a GitLab deploy job has: the key and known hosts in variables, and CI's own variables.
export SSH_PRIVATE_KEY=$(base64 -w0 < "$FERRY_HOSTS_DIR/id_ed25519")   # masked variables hold base64
export SSH_KNOWN_HOSTS=$(cat "$FERRY_HOSTS_DIR/known_hosts")
export FRONTEND_WEB1=$FERRY_LOGIN@127.0.0.1:$web1 FRONTEND_WEB2=$FERRY_LOGIN@127.0.0.1:$web2
export CI_COMMIT_REF_NAME=main CI_PIPELINE_ID=1001 GITLAB_USER_LOGIN=demo
export CI_COMMIT_SHA=$(printf 'demo-1' | sha1sum | cut -c1-40)

section "ferry check"
"$ferry" check playbooks/frontend-dist.yml

section "npm run build (stand-in: a 2,000-file bundle from ../shared/bench/make_corpus.py)"
work=$FERRY_HOSTS_DIR/work
rm -rf "$work" && mkdir -p "$work"
python3 ../shared/bench/make_corpus.py "$work/dist" --files 2000 --mb 40 --seed 1
cd "$work"

section "frontend dist push: first deploy"
"$ferry" deploy "$repo/playbooks/frontend-dist.yml"

section "next build: 5% of files changed; plan, then deploy"
python3 "$repo/../shared/bench/make_corpus.py" dist --mutate 5 --seed 2
export CI_COMMIT_SHA=$(printf 'demo-2' | sha1sum | cut -c1-40) CI_PIPELINE_ID=1002
"$ferry" deploy "$repo/playbooks/frontend-dist.yml" --plan
"$ferry" deploy "$repo/playbooks/frontend-dist.yml"

section "ferry status"
"$ferry" status "$repo/playbooks/frontend-dist.yml"

section "rollback"
"$ferry" rollback "$repo/playbooks/frontend-dist.yml" --env production
"$ferry" status "$repo/playbooks/frontend-dist.yml"
echo "web1 serves: $(readlink "/proc/$(cat "$FERRY_HOSTS_DIR/web1/sshd.pid")/root/var/www/shop")"

# ---- Containers: the tag-triggered image publish and the release-branch deploy -------------------
# Docker's engine and an htpasswd registry on 127.0.0.1:5000 (tests/env/docker.sh); images are small
# busybox-static stand-ins made with `docker import`, since nothing can be pulled from the internet.
cd "$repo"
section "docker engine and registry"
bash tests/env/docker.sh
build=$(start_sshd build1)
staging=$(start_sshd staging1)
export SSH_KNOWN_HOSTS=$(cat "$FERRY_HOSTS_DIR/known_hosts")
export REGISTRY=127.0.0.1:5000 REGISTRY_USER=ferry REGISTRY_PASSWORD=ferry-registry-secret
export DB_PASSWORD=demo-db-secret
base=$(bash tests/env/docker.sh image ferry-demo/base:1 "shop image")
export MYSQL_IMAGE=$(bash tests/env/docker.sh image ferry-demo/mysql:8.0 "mysql stand-in")
export REDIS_IMAGE=$(bash tests/env/docker.sh image ferry-demo/redis:7 "redis stand-in")
# The pipeline's own build job would push the app image; do it here with the local CLI.
echo "$REGISTRY_PASSWORD" | docker login -u "$REGISTRY_USER" --password-stdin "$REGISTRY" >/dev/null 2>&1
push_app() { # push_app REF_SLUG SHA VERSION [broken]
  local img=$REGISTRY/shop:$1-${2:0:8}
  bash tests/env/docker.sh image "$img" "$3" >/dev/null
  if [ "${4:-}" = broken ]; then # same image without /health: it never gets healthy
    printf 'FROM %s\nRUN rm /www/health\n' "$img" | docker build -q -t "$img" - >/dev/null 2>&1
  fi
  docker push -q "$img" >/dev/null
}

# (A tag of this run: the registry keeps what earlier runs published, and a published tag is not
# replaced by another build.)
tag=v1.0.$(date +%s)
section "tag $tag: build on the build host, pin to the tag, push, prune"
mkdir -p "$work/docker"
printf 'FROM %s\nCOPY release.txt /www/release.txt\n' "$base" > "$work/docker/Dockerfile"
echo "built by ferry for $tag" > "$work/docker/release.txt"
(
  cd "$work"
  export BUILD_HOST=$FERRY_LOGIN@127.0.0.1:$build BUILD_ROOT=$FERRY_HOSTS_DIR/build BUILD_CONTEXT=docker/
  export CI_COMMIT_TAG=$tag CI_COMMIT_REF_NAME=$tag CI_PIPELINE_ID=2001
  export CI_COMMIT_SHA=$(printf 'tag-v1' | sha1sum | cut -c1-40)
  "$ferry" deploy "$repo/playbooks/tag-publish.yml"
)
docker pull -q "$REGISTRY/shop:$tag" >/dev/null && echo "registry has $REGISTRY/shop:$tag"

section "push to release-1.4: bundle, MySQL and Redis accessories, health-gated app container"
app_port=$(free_port)
mkdir -p "$work/backend" && echo "templates for release-1.4" > "$work/backend/index.html"
export STAGING_HOST=$FERRY_LOGIN@127.0.0.1:$staging STAGING_ROOT=$FERRY_HOSTS_DIR/staging APP_PORT=$app_port
export BUNDLE_DIR=$work/backend STAGING_URL_HOST=127.0.0.1
export CI_COMMIT_REF_NAME=release-1.4 CI_COMMIT_REF_SLUG=release-1-4 CI_PIPELINE_ID=3001
export CI_COMMIT_SHA=$(printf 'rel-1' | sha1sum | cut -c1-40)
push_app release-1-4 "$CI_COMMIT_SHA" "app $CI_COMMIT_SHA"
(cd "$work" && "$ferry" deploy "$repo/playbooks/release-deploy.yml")
echo "app answers: $(curl -s "http://127.0.0.1:$app_port/version")"

section "the same pipeline again: nothing to do"
(cd "$work" && "$ferry" deploy "$repo/playbooks/release-deploy.yml")

section "next commit: new bundle and app container; accessories are left alone"
export CI_COMMIT_SHA=$(printf 'rel-2' | sha1sum | cut -c1-40) CI_PIPELINE_ID=3002
echo "templates for $CI_COMMIT_SHA" > "$work/backend/index.html"
push_app release-1-4 "$CI_COMMIT_SHA" "app $CI_COMMIT_SHA"
(cd "$work" && "$ferry" deploy "$repo/playbooks/release-deploy.yml")
echo "app answers: $(curl -s "http://127.0.0.1:$app_port/version")"

section "ferry rollback: bundle and app container back to the first release-1.4 commit"
(cd "$work" && "$ferry" rollback "$repo/playbooks/release-deploy.yml" --env staging)
echo "app answers: $(curl -s "http://127.0.0.1:$app_port/version")"

section "a commit whose image never gets healthy (60s health timeout): the job fails, the old container serves again"
export CI_COMMIT_SHA=$(printf 'rel-3' | sha1sum | cut -c1-40) CI_PIPELINE_ID=3003
push_app release-1-4 "$CI_COMMIT_SHA" "app $CI_COMMIT_SHA" broken
(cd "$work" && "$ferry" deploy "$repo/playbooks/release-deploy.yml") || echo "(deploy failed, as it should)"
echo "app answers: $(curl -s "http://127.0.0.1:$app_port/version")"
docker ps -a --filter name=shop- --format 'table {{.Names}}\t{{.Image}}\t{{.Status}}'
