#!/usr/bin/env bash
# Start the Docker engine and a local registry for ferry's tests and demo, as root, idempotently:
# what is already running is left alone. Used by tests/env/test.sh, tests/env/demo.sh and the Rust
# harness (tests/support/docker.rs), so that CI's fresh Debian machine needs nothing else.
#
#   dockerd   on the default socket /var/run/docker.sock. Storage driver: overlay2 when the kernel
#             allows it, else vfs (slow but works anywhere, e.g. inside a container). Networking:
#             iptables when it works, else --iptables=false (published ports then go through
#             docker-proxy, which is enough for 127.0.0.1).
#   registry  Debian's docker-registry on 127.0.0.1:$FERRY_REGISTRY_PORT (5000) with htpasswd auth:
#             user `ferry`, password `ferry-registry-secret` (test-only credentials).
#
# Logs and state: $FERRY_DOCKER_DIR (/tmp/ferry-docker).
#
#   bash tests/env/docker.sh [start]              start what is not running
#   bash tests/env/docker.sh image NAME VERSION   import a busybox-static test image
#   bash tests/env/docker.sh stop                 stop what this script started
set -euo pipefail
dir=${FERRY_DOCKER_DIR:-/tmp/ferry-docker}
reg_port=${FERRY_REGISTRY_PORT:-5000}
reg_user=ferry
reg_pass=ferry-registry-secret
mkdir -p "$dir"

wait_for() { # wait_for SECONDS CMD...: retry CMD until it succeeds
  local n=$(($1 * 10)); shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

start_dockerd() {
  if docker version >/dev/null 2>&1; then return 0; fi
  local args=(--host unix:///var/run/docker.sock --data-root "$dir/data" --exec-root "$dir/exec"
              --pidfile "$dir/dockerd.pid")
  if [ ! -f "$dir/driver" ]; then
    # overlay2 needs overlayfs and a data root that is not itself on overlayfs.
    mkdir -p "$dir/probe/l" "$dir/probe/u" "$dir/probe/w" "$dir/probe/m"
    if mount -t overlay overlay -o "lowerdir=$dir/probe/l,upperdir=$dir/probe/u,workdir=$dir/probe/w" \
        "$dir/probe/m" 2>/dev/null; then
      umount "$dir/probe/m"; echo overlay2 > "$dir/driver"
    else
      echo vfs > "$dir/driver"
    fi
    rm -rf "$dir/probe"
  fi
  args+=(--storage-driver "$(cat "$dir/driver")")
  if ! iptables -t nat -L -n >/dev/null 2>&1; then args+=(--iptables=false); fi
  echo "starting dockerd ${args[*]}" >&2
  setsid dockerd "${args[@]}" >"$dir/dockerd.log" 2>&1 < /dev/null &
  if ! wait_for 60 docker version; then
    echo "dockerd did not start; its log ($dir/dockerd.log):" >&2
    tail -n 30 "$dir/dockerd.log" >&2
    return 1
  fi
}

start_registry() {
  # A registry with auth answers 401 on /v2/ without credentials.
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$reg_port/v2/")" = 401 ]; then
    return 0
  fi
  # The registry reads bcrypt only; htpasswd is in apache2-utils (tests/env/install.sh).
  htpasswd -Bbn "$reg_user" "$reg_pass" > "$dir/htpasswd"
  mkdir -p "$dir/registry"
  cat > "$dir/registry.yml" <<CONF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$reg_port
auth:
  htpasswd:
    realm: ferry-test
    path: $dir/htpasswd
CONF
  echo "starting docker-registry on 127.0.0.1:$reg_port" >&2
  setsid docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 < /dev/null &
  echo $! > "$dir/registry.pid"
  if ! wait_for 20 sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$reg_port/v2/)\" = 401 ]"; then
    echo "docker-registry did not start; its log ($dir/registry.log):" >&2
    tail -n 30 "$dir/registry.log" >&2
    return 1
  fi
}

# image NAME VERSION: import a small image from Debian's busybox-static (nothing can be pulled from
# the internet): `httpd` serves /www on port 8080, /version says VERSION, /health says ok.
image() {
  local name=$1 version=$2 root
  root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/www" "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for a in sh httpd sleep cat ls wget; do ln -s busybox "$root/bin/$a"; done
  echo "$version" > "$root/www/version"
  echo ok > "$root/www/health"
  tar -C "$root" -c . | docker import \
    --change 'CMD ["/bin/sh", "-c", "echo serving $(cat /www/version); trap '"'"'exit 0'"'"' TERM; httpd -f -p 8080 -h /www & wait"]' \
    - "$name" >/dev/null
  rm -rf "$root"
  echo "$name"
}

stop_all() {
  for f in "$dir/registry.pid" "$dir/dockerd.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
}

case "${1:-start}" in
  start) start_dockerd; start_registry ;;
  stop) stop_all ;;
  image) start_dockerd; image "$2" "$3" ;;
  *) echo "usage: $0 [start|stop|image NAME VERSION]" >&2; exit 2 ;;
esac
