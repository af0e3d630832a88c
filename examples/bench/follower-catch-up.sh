#!/usr/bin/env bash
# How a follower that missed large writes catches up from the log: a 3-node
# cluster on 127.0.0.1, node 3 killed with SIGKILL, N random ~1 MiB blobs
# written to the leader 16 at a time (so Raft entries carry several), node 3
# restarted on its data dir and port. Prints the time until node 3 serves the
# last blob (checked byte for byte) and the leader's peak RSS; exits non-zero
# if node 3 has not caught up within 30 s.
#
#   bash examples/bench/follower-catch-up.sh [FLAGSTONE_BIN] [N]
#
# Stops only the processes it started.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN=${1:-$ROOT/target/release/flagstone}
N=${2:-120}
NAME=follower
# shellcheck source=nodes.sh
source "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"

start 1 127.0.0.1:0; URL1=$(url 1)
start 2 127.0.0.1:0 --join "$URL1"; start 3 127.0.0.1:0 --join "$URL1"
url 2 >/dev/null; URL3=$(url 3)
for _ in $(seq 1 100); do curl -sf -o /dev/null "$URL3/v1/kv/ready" && break; curl -sf -o /dev/null -X PUT --data-binary x "$URL1/v1/kv/ready" || true; sleep 0.1; done

kill -9 "${PIDS[3]}"; wait "${PIDS[3]}" 2>/dev/null || true
head -c $((1048576 - 64)) /dev/urandom >"$WORK/blob"
seq 1 "$N" | xargs -P 16 -I{} curl -sf -o /dev/null -X PUT --data-binary @"$WORK/blob" "$URL1/v1/kv/blob/{}"
echo "wrote $N blobs while node 3 was down; leader's peak RSS $(peak_mib "${PIDS[1]}") MiB"

start 3 "${URL3#http://}"; url 3 >/dev/null
t0=$(date +%s%N)
caught_up=no
for _ in $(seq 1 600); do
  if curl -sf -o "$WORK/got" "$URL3/v1/kv/blob/$N"; then caught_up=yes; break; fi
  sleep 0.05
done
t1=$(date +%s%N)
echo "leader's peak RSS $(peak_mib "${PIDS[1]}") MiB; AppendEntries timeouts in its log: $(grep -c 'timeout after' "$WORK/1.log" || true)"
[[ $caught_up == yes ]] || { echo "FAIL: node 3 had not caught up after $(( (t1 - t0) / 1000000 )) ms" >&2; exit 1; }
cmp -s "$WORK/got" "$WORK/blob" || { echo "FAIL: node 3's blob/$N differs" >&2; exit 1; }
echo "node 3 caught up in $(( (t1 - t0) / 1000000 )) ms"
