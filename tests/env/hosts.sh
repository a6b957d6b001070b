# Shell helpers that start local test hosts: real OpenSSH sshd on loopback ports, with generated host
# keys and an authorized client key. Sourced by tests/env/demo.sh and bench/run.sh (the Rust tests
# have the same in tests/support/mod.rs). Everything lives under $FERRY_HOSTS_DIR.

: "${FERRY_HOSTS_DIR:=/tmp/ferry-hosts}"

# free_port: print a free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The login on the test hosts: a second uid-0 user whose shell is /bin/sh with no rc files, so the
# machine's own root dotfiles (a .bashrc running `pyenv init`, say) do not slow or hang sessions.
# The Rust test harness uses the same user.
FERRY_LOGIN=ferryroot
login_user() {
  mkdir -p /var/lib/ferry-test-root
  id "$FERRY_LOGIN" >/dev/null 2>&1 ||
    useradd -o -u 0 -g 0 -M -d /var/lib/ferry-test-root -s /bin/sh "$FERRY_LOGIN"
  usermod -p '*' "$FERRY_LOGIN"
}

# client_key: make (once) the client key $FERRY_HOSTS_DIR/id_ed25519.
client_key() {
  mkdir -p "$FERRY_HOSTS_DIR"
  [ -f "$FERRY_HOSTS_DIR/id_ed25519" ] ||
    ssh-keygen -q -t ed25519 -N '' -C ferry-demo -f "$FERRY_HOSTS_DIR/id_ed25519"
}

# start_sshd NAME [DIR...]: start sshd for host NAME; prints its port. Appends its key to
# known_hosts. Each DIR becomes the host's own empty tmpfs (a private mount namespace), so that two
# hosts on this machine can both serve /var/www/shop like two servers. See a host's files under
# /proc/$(cat $FERRY_HOSTS_DIR/NAME/sshd.pid)/root/.
start_sshd() {
  local name=$1 dir="$FERRY_HOSTS_DIR/$1" port
  shift
  login_user
  client_key
  mkdir -p "$dir" /run/sshd
  [ -f "$dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_ed25519"
  cp "$FERRY_HOSTS_DIR/id_ed25519.pub" "$dir/authorized_keys"
  if [ -f "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null; then
    cat "$dir/port"
    return
  fi
  port=$(free_port)
  cat > "$dir/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
StrictModes no
UsePAM no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxStartups 100
MaxSessions 20
CONF
  if [ $# -gt 0 ]; then
    FERRY_PRIVATE_DIRS="$*" unshare --mount --propagation private sh -c \
      'for d in $FERRY_PRIVATE_DIRS; do mkdir -p "$d" && mount -t tmpfs ferry-demo "$d" || exit 1; done
       exec /usr/sbin/sshd "$@"' sh -f "$dir/sshd_config" -E "$dir/sshd.log"
  else
    /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log"
  fi
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  echo "$port" > "$dir/port"
  echo "[127.0.0.1]:$port $(cat "$dir/host_ed25519.pub")" >> "$FERRY_HOSTS_DIR/known_hosts"
  echo "$port"
}

# stop_hosts: stop every sshd started here.
stop_hosts() {
  local pid
  for pid in "$FERRY_HOSTS_DIR"/*/sshd.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
  done
  return 0
}
