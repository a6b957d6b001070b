#!/usr/bin/env bash
# The test command: install what the tests need, then run every test (unit and integration, against
# real sshd, dockerd and a registry that the tests start themselves).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/env/install.sh
# (Rust from rustup, if install.sh just put it there.)
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
# The Docker engine and registry the container tests use (the harness would start them too).
bash tests/env/docker.sh
cargo build --release --locked 2>&1 | tail -n 3
cargo test --locked --no-fail-fast 2>&1
