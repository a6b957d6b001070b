#!/usr/bin/env bash
# Install what ferry's tests need on a fresh Debian machine (as root): OpenSSH, rsync, BusyBox,
# Docker's engine and a registry. Idempotent: it skips what is there.
set -euo pipefail
need=()
for pair in sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client rsync:rsync \
            busybox:busybox-static dockerd:docker.io docker-registry:docker-registry \
            hyperfine:hyperfine htpasswd:apache2-utils ip:iproute2 curl:curl python3:python3; do
  bin=${pair%%:*} pkg=${pair#*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
done
# busybox-static, not the dynamic busybox: the test images need a static binary.
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
mkdir -p /run/sshd

# Rust to build ferry: its dependencies (russh, serde-saphyr) need rustc 1.89 or later, newer than
# Debian 12's own, so it comes from rustup (into ~/.cargo) when no such cargo is there.
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
rust_ok() {
  local v
  v=$(rustc --version 2>/dev/null | awk '{print $2}') || return 1
  [ -n "$v" ] && [ "$(printf '%s\n1.89.0\n' "$v" | sort -V | head -n 1)" = 1.89.0 ] && command -v cargo >/dev/null
}
if ! rust_ok; then
  echo "installing Rust with rustup (ferry needs rustc 1.89 or later)" >&2
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
  . "$HOME/.cargo/env"
  rust_ok || { echo "install.sh: rustc 1.89 or later is needed to build ferry" >&2; exit 1; }
fi
