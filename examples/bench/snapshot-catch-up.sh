#!/usr/bin/env bash
# How a node that joins late catches up by snapshot, with large values:
# a 3-node cluster on 127.0.0.1 takes N random 1 MiB blobs and 1,300 small
# writes (snapshots every 200 entries, so the log behind the last one is
# purged), then a 4th node joins and must install a ~N MiB snapshot.
# Prints the time until the 4th node serves the last write, the peak RSS of
# every node, and checks the 4th node's copy of the last blob byte for byte
# (exits non-zero if it differs or never arrives).
#
#   bash examples/bench/snapshot-catch-up.sh [FLAGSTONE_BIN] [N]
#
# Stops only the processes it started.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN=${1:-$ROOT/target/release/flagstone}
N=${2:-200}
[[ -x "$BIN" ]] || { echo "no flagstone binary at $BIN (cargo build --release -p flagstone)" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flagstone-catch-up.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

start() {
  local id=$1; shift
  "$BIN" serve --id "$id" --listen 127.0.0.1:0 --data-dir "$WORK/node-$id" --snapshot-every 200 "$@" \
    >"$WORK/$id.out" 2>"$WORK/$id.log" &
  PIDS+=($!)
}
url() {
  for _ in $(seq 1 100); do
    [[ -s "$WORK/$1.out" ]] && { awk '{print $NF; exit}' "$WORK/$1.out"; return 0; }
    sleep 0.05
  done
  echo "node $1 did not start" >&2; exit 1
}
peak_mib() { awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }
peaks() { local out=""; for i in "${!PIDS[@]}"; do out+=" node-$((i + 1)) $(peak_mib "${PIDS[$i]}")"; done; echo "$out"; }

start 1; URL1=$(url 1)
start 2 --join "$URL1"; start 3 --join "$URL1"; url 2 >/dev/null; url 3 >/dev/null
for _ in $(seq 1 100); do curl -sf -o /dev/null -X PUT --data-binary x "$URL1/v1/kv/ready" && break; sleep 0.1; done
for i in $(seq 1 "$N"); do
  head -c 1048576 /dev/urandom >"$WORK/blob"
  curl -sf -o /dev/null -X PUT --data-binary @"$WORK/blob" "$URL1/v1/kv/blob/$i"
done
for i in $(seq 1 1300); do curl -sf -o /dev/null -X PUT --data-binary "v$i" "$URL1/v1/kv/small/$i"; done
sleep 2
echo "after $N blobs of 1 MiB and 1300 small writes, peak RSS (MiB):$(peaks)"

start 4 --join "$URL1"; URL4=$(url 4)
t0=$(date +%s%N)
for _ in $(seq 1 1200); do curl -sf -o /dev/null "$URL4/v1/kv/small/1300" && break; sleep 0.05; done
t1=$(date +%s%N)
curl -sf -o "$WORK/got" "$URL4/v1/kv/blob/$N" || { echo "FAIL: node 4 never served blob/$N" >&2; exit 1; }
cmp -s "$WORK/got" "$WORK/blob" || { echo "FAIL: node 4's blob/$N differs" >&2; exit 1; }
grep -h 'installed snapshot' "$WORK/4.log" | sed 's/\x1b\[[0-9;]*m//g; s/^.*installed snapshot/installed snapshot/' | tail -1
echo "node 4 caught up in $(( (t1 - t0) / 1000000 )) ms; peak RSS (MiB):$(peaks)"
echo "warnings in node 4's log: $(grep -c WARN "$WORK/4.log" || true)"
echo "snapshot warnings in the leader's log: $(grep -c 'WARN.*[Ss]napshot' "$WORK/1.log" || true)"
grep -h 'WARN.*[Ss]napshot' "$WORK/1.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c 1-200 | head -3 || true
