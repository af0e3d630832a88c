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
NAME=catch-up
# shellcheck source=nodes.sh
source "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"
peaks() { local out=""; for i in "${!PIDS[@]}"; do out+=" node-$i $(peak_mib "${PIDS[$i]}")"; done; echo "$out"; }
# Every node snapshots every 200 entries.
node() { local id=$1; shift; start "$id" 127.0.0.1:0 --snapshot-every 200 "$@"; }

node 1; URL1=$(url 1)
node 2 --join "$URL1"; node 3 --join "$URL1"; url 2 >/dev/null; url 3 >/dev/null
for _ in $(seq 1 100); do curl -sf -o /dev/null -X PUT --data-binary x "$URL1/v1/kv/ready" && break; sleep 0.1; done
for i in $(seq 1 "$N"); do
  head -c 1048576 /dev/urandom >"$WORK/blob"
  curl -sf -o /dev/null -X PUT --data-binary @"$WORK/blob" "$URL1/v1/kv/blob/$i"
done
for i in $(seq 1 1300); do curl -sf -o /dev/null -X PUT --data-binary "v$i" "$URL1/v1/kv/small/$i"; done
sleep 2
echo "after $N blobs of 1 MiB and 1300 small writes, peak RSS (MiB):$(peaks)"

node 4 --join "$URL1"; URL4=$(url 4)
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
