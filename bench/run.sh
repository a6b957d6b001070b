#!/usr/bin/env bash
# ferry sync vs rsync over OpenSSH, in one run, taking turns. Run from anywhere, as root:
#
#   bash bench/run.sh                 # 5,000 files / 100 MB and 50,000 files / 500 MB
#   FERRY_BENCH_CORPORA="500:20" bash bench/run.sh     # files:MB pairs, for a quick look
#   FERRY_BENCH_REPS=5 bash bench/run.sh                # repetitions (the table shows medians)
#
# It starts a local sshd (tests/env/hosts.sh), makes trees with ../shared/bench/make_corpus.py, and for
# each corpus runs three scenarios: first deploy, no-change redeploy, 5% change (--mutate 5). Each
# scenario runs ferry in release mode against `rsync -a --delete --link-dest` (a new release
# directory hard-linked to the previous one, then a symlink switch: the release-directory case), and
# ferry `mode: in-place` against `rsync -a --delete` (one directory updated in place: the plain case).
# Wall time is measured around each command; bytes on the wire are read from iptables counters on the
# sshd port (raw table, both directions, IP and TCP headers included, the same for every tool); CPU
# time is the whole machine's busy time from /proc/stat (both ends share it: the controller, ssh,
# sshd and the host's shell, tar, find and gzip all run here).
# The table is printed and written to bench/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${FERRY_BENCH_DIR:-/tmp/ferry-bench}
CORPORA=${FERRY_BENCH_CORPORA:-"5000:100 50000:500"}
REPS=${FERRY_BENCH_REPS:-3}
CORPUS_PY=${FERRY_CORPUS_PY:-$REPO/../shared/bench/make_corpus.py}
OUT=$REPO/bench/results.md

rm -rf "$WORK"
mkdir -p "$WORK"
export FERRY_HOSTS_DIR=$WORK/hosts
# shellcheck source=../tests/env/hosts.sh
. tests/env/hosts.sh

echo "building ferry (release)..." >&2
cargo build --release -q
FERRY=$REPO/target/release/ferry
PORT=$(start_sshd bench)
KEY=$FERRY_HOSTS_DIR/id_ed25519
KH=$FERRY_HOSTS_DIR/known_hosts
TAG="ferry-bench-$PORT"

# Byte counters: client->server and server->client on the sshd port.
# Rules without a target in the raw table only count; other users of the machine's firewall (docker,
# tests) do not reorder or flush them, and they change nothing about how packets are handled.
IPT=(iptables -t raw)
cleanup() {
  while "${IPT[@]}" -D PREROUTING -p tcp --dport "$PORT" -m comment --comment "$TAG" 2>/dev/null; do :; done
  while "${IPT[@]}" -D PREROUTING -p tcp --sport "$PORT" -m comment --comment "$TAG" 2>/dev/null; do :; done
  stop_hosts
}
trap cleanup EXIT
wire_bytes() {
  "${IPT[@]}" -L PREROUTING -v -x -n 2>/dev/null | awk -v t="$TAG" 'index($0, t) { s += $2 } END { printf "%.0f\n", s }'
}

SSH="ssh -p $PORT -i $KEY -o UserKnownHostsFile=$KH -o StrictHostKeyChecking=yes -o BatchMode=yes"
export HOME=$WORK/home   # ferry's hash cache lives here (warm after the first run, as on a dev box)
mkdir -p "$HOME"

ROWS=$WORK/rows.tsv
: > "$ROWS"

# What every rsync run pays before it moves a byte: an OpenSSH connection (key exchange, auth,
# session). Reported beside the table, so a ratio can be read with it in mind.
SSH_TRUE=$WORK/ssh-true.txt
for _ in 1 2 3 4 5; do
  t0=$(date +%s.%N); $SSH "$FERRY_LOGIN@127.0.0.1" true; t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
done | sort -n | sed -n 3p > "$SSH_TRUE"

# The counting rules, re-added if something else on the machine removed them meanwhile.
ensure_counters() {
  local dir
  for dir in --dport --sport; do
    "${IPT[@]}" -C PREROUTING -p tcp "$dir" "$PORT" -m comment --comment "$TAG" 2>/dev/null ||
      "${IPT[@]}" -I PREROUTING -p tcp "$dir" "$PORT" -m comment --comment "$TAG" 2>/dev/null
  done
}
counters_present() {
  "${IPT[@]}" -C PREROUTING -p tcp --dport "$PORT" -m comment --comment "$TAG" 2>/dev/null &&
    "${IPT[@]}" -C PREROUTING -p tcp --sport "$PORT" -m comment --comment "$TAG" 2>/dev/null
}

# The machine's busy CPU time so far, in clock ticks (user, nice, system, irq, softirq, steal).
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
TICK=$(getconf CLK_TCK)

# measure LABEL CMD...: run, record seconds, wire bytes (-1 if the counters vanished mid-run) and
# busy CPU seconds.
measure() {
  local label=$1; shift
  local b0 b1 t0 t1 c0 c1 secs cpu
  ensure_counters
  # (The previous tool's writes go to disk first: writeback of 500 MB would land on this one.)
  sync
  b0=$(wire_bytes); c0=$(busy_ticks); t0=$(date +%s.%N)
  "$@" > "$WORK/last.log" 2>&1 || { cat "$WORK/last.log" >&2; echo "FAILED: $label" >&2; exit 1; }
  t1=$(date +%s.%N); c1=$(busy_ticks); b1=$(wire_bytes)
  counters_present && [ "$b1" -ge "$b0" ] || b1=$((b0 - 1))
  secs=$(echo "$t1 - $t0" | bc -l) cpu=$(echo "($c1 - $c0) / $TICK" | bc -l)
  printf '%s\t%s\t%s\t%s\n' "$label" "$secs" "$((b1 - b0))" "$cpu" >> "$ROWS"
  printf '  %-40s %8.2fs %12d bytes %6.2f CPU s\n' "$label" "$secs" "$((b1 - b0))" "$cpu" >&2
}

for spec in $CORPORA; do
  files=${spec%%:*} mb=${spec##*:}
  name="${files}f-${mb}MB"
  pristine=$WORK/pristine-$name
  echo "corpus $name: making the tree..." >&2
  python3 "$CORPUS_PY" "$pristine" --files "$files" --mb "$mb" --seed 7
  for rep in $(seq "$REPS"); do
    # Fresh directories per run, all removed at the end: ext4 makes files slowly for a while after
    # mass deletions, which would land on whichever tool writes first.
    src=$WORK/src-$name-$rep
    dst=$WORK/dst-$name-$rep
    cp -a "$pristine" "$src"
    sync; sleep 2
    mkdir -p "$dst/plain" "$dst/link"
    for mode in release in-place; do
      cat > "$WORK/ferry-$name-$mode.yml" <<YML
app: bench-$mode
environments:
  bench:
    root: $dst
    hosts: ["$FERRY_LOGIN@127.0.0.1:$PORT"]
    steps:
      - sync: { from: "$src", to: ferry-$mode, keep: 3, mode: $mode }
YML
    done
    n=0
    ferry_deploy() {
      n=$((n + 1))
      "$FERRY" deploy "$WORK/ferry-$name-$1.yml" --env bench --ref main --sha "$(printf '%040x' "$n")" \
        --identity "$KEY" --known-hosts "$KH"
    }
    rel=0
    rsync_link() {
      rel=$((rel + 1))
      local link=()
      [ "$rel" -gt 1 ] && link=(--link-dest="../rel-$((rel - 1))")
      rsync -a --delete "${link[@]}" -e "$SSH" "$src/" "$FERRY_LOGIN@127.0.0.1:$dst/link/rel-$rel/" &&
        $SSH $FERRY_LOGIN@127.0.0.1 "ln -sfn rel-$rel $dst/link/.cur.tmp && mv -T $dst/link/.cur.tmp $dst/link/current"
    }
    rsync_plain() { rsync -a --delete -e "$SSH" "$src/" "$FERRY_LOGIN@127.0.0.1:$dst/plain/current/"; }
    for scenario in first no-change change-5pct; do
      echo "corpus $name, run $rep/$REPS, $scenario:" >&2
      [ "$scenario" = change-5pct ] && python3 "$CORPUS_PY" "$src" --mutate 5 --seed 11
      sync
      # Take turns in a rotating order: whoever goes first after the tree was copied pays for the
      # filesystem's recently freed inodes (ext4 scans past them), so no tool always goes first.
      order=(ferry rsync link inplace)
      for k in 0 1 2 3; do
        case ${order[$(( (k + rep - 1) % 4 ))]} in
          ferry) measure "$name	$scenario	ferry" ferry_deploy release ;;
          inplace) measure "$name	$scenario	ferry in-place" ferry_deploy in-place ;;
          rsync) measure "$name	$scenario	rsync" rsync_plain ;;
          link) measure "$name	$scenario	rsync --link-dest" rsync_link ;;
        esac
      done
    done
    # Sanity: every tool's live tree equals the source.
    for t in ferry-release ferry-in-place link/current plain/current; do
      diff -r "$src" "$dst/$t/" > /dev/null || { echo "$t differs from the source!" >&2; exit 1; }
    done
  done
done
rm -rf "$WORK"/src-* "$WORK"/dst-* "$WORK"/pristine-*

python3 - "$ROWS" "$OUT" "$SSH_TRUE" <<'PY'
import sys, collections, platform, os, datetime, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs = collections.OrderedDict()
for corpus, scen, tool, secs, byt, cpu in rows:
    runs.setdefault((corpus, scen), {}).setdefault(tool, []).append((float(secs), int(byt), float(cpu)))
by = collections.OrderedDict()
for key, tools in runs.items():
    by[key] = {t: (statistics.median(s for s, _, _ in v),
                   int(statistics.median([b for _, b, _ in v if b >= 0] or [-1])),
                   statistics.median(c for _, _, c in v))
               for t, v in tools.items()}
reps = max(len(v) for tools in runs.values() for v in tools.values())
targets = {"first": 1.0, "no-change": 0.5, "change-5pct": 0.6}
def mb(b): return f"{b/1e6:.2f} MB" if b >= 0 else "n/a"
def bratio(a, b): return f"{a[1]/b[1]:.2f}x" if min(a[1], b[1]) > 0 else "n/a"
out = ["| corpus | scenario | target | ferry release | rsync --link-dest | ratio | bytes ratio | "
       "ferry in-place | rsync | ratio | bytes ratio | ferry release / rsync |",
       "|---|---|---|---|---|---|---|---|---|---|---|---|"]
for (corpus, scen), t in by.items():
    f, i, p, l = t["ferry"], t["ferry in-place"], t["rsync"], t["rsync --link-dest"]
    out.append(f"| {corpus} | {scen} | ≤ {targets[scen]}x | {f[0]:.2f}s | {l[0]:.2f}s | {f[0]/l[0]:.2f}x | {bratio(f, l)} | "
               f"{i[0]:.2f}s | {p[0]:.2f}s | {i[0]/p[0]:.2f}x | {bratio(i, p)} | {f[0]/p[0]:.2f}x |")
out += ["", "Bytes on the wire:", "",
        "| corpus | scenario | ferry release | rsync --link-dest | ferry in-place | rsync |",
        "|---|---|---|---|---|---|"]
for (corpus, scen), t in by.items():
    out.append(f"| {corpus} | {scen} | " + " | ".join(mb(t[k][1]) for k in
               ("ferry", "rsync --link-dest", "ferry in-place", "rsync")) + " |")
out += ["", f"CPU time of both ends (the whole machine's busy time, {os.cpu_count()} cores), seconds:", "",
        "| corpus | scenario | ferry release | rsync --link-dest | ratio | ferry in-place | rsync | ratio |",
        "|---|---|---|---|---|---|---|---|"]
def cratio(a, b): return f"{a/b:.2f}x" if b > 0 else "n/a"
for (corpus, scen), t in by.items():
    f, i, p, l = (t[k][2] for k in ("ferry", "ferry in-place", "rsync", "rsync --link-dest"))
    out.append(f"| {corpus} | {scen} | {f:.2f} | {l:.2f} | {cratio(f, l)} | {i:.2f} | {p:.2f} | {cratio(i, p)} |")
table = "\n".join(out)
print(table)
head = (f"# ferry sync vs rsync\n\nMeasured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC by `bash bench/run.sh` on "
        f"{platform.machine()}, {os.cpu_count()} cores, loopback sshd (OpenSSH). Wall time per command; bytes on the "
        "wire from iptables counters on the sshd port, both directions; CPU time from /proc/stat (the whole machine: both ends run here). ratio = ferry / rsync (lower is better): "
        "ferry's release mode against `rsync --link-dest` (the release-directory case), ferry's in-place mode "
        "against `rsync -a --delete` (the plain case), and release mode against plain rsync for reference. "
        f"Medians of {reps} runs. Each run starts from a fresh copy of the tree, so ferry's hash cache is cold for the first deploy (as in CI); later deploys reuse it, and the manifests ferry kept of what it sent.\n\n"
        f"An OpenSSH connection (`ssh host true`, median of 5), which each rsync command pays before it moves a byte: "
        f"{float(open(sys.argv[3]).read()):.2f}s. ferry connects with russh in its own process.\n\n")
open(sys.argv[2], "w").write(head + table + "\n")
PY
echo "written to $OUT" >&2
