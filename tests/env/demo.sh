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
cargo build --release --locked 2>&1 | tail -n 1
ferry=$repo/target/release/ferry
section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

section "starting two web hosts (sshd on loopback)"
web1=$(start_sshd web1)
web2=$(start_sshd web2)
echo "web1: 127.0.0.1:$web1   web2: 127.0.0.1:$web2"

# What a GitLab deploy job has: the key and known hosts in variables, and CI's own variables.
export SSH_PRIVATE_KEY=$(base64 -w0 < "$FERRY_HOSTS_DIR/id_ed25519")   # masked variables hold base64
export SSH_KNOWN_HOSTS=$(cat "$FERRY_HOSTS_DIR/known_hosts")
export FRONTEND_WEB1=root@127.0.0.1:$web1 FRONTEND_WEB2=root@127.0.0.1:$web2
export FRONTEND_SITE_PATH=$FERRY_HOSTS_DIR/www/shop FRONTEND_ORIGIN_PATH=$FERRY_HOSTS_DIR/www/shop-origin
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
ls -l "$FRONTEND_SITE_PATH"
