#!/usr/bin/env bash
# The custom-data example: a 3-node flagstone cluster on 127.0.0.1 where node-1
# stores feature flags, app config and a global counter, every node reads them
# back, the script CHECKS that all three nodes return identical values, and
# all three nodes increment the counter concurrently with compare-and-set.
#
# Exits non-zero if anything did not replicate. Stops only what it started.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flagstone-example.XXXXXX")"
PIDS=()

cleanup() {
  local status=$?
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && wait "$pid" 2>/dev/null || true
  done
  if [[ $status -ne 0 ]]; then
    echo "--- example FAILED (exit $status); node logs follow ---" >&2
    tail -n 20 "$WORK"/node-*.log >&2 || true
  fi
  rm -rf "$WORK"
  exit $status
}
trap cleanup EXIT INT TERM

fail() { echo "FAIL: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

BIN="${FLAGSTONE_BIN:-}"
if [[ -z "$BIN" ]]; then
  (cd "$ROOT" && cargo build -q -p flagstone)
  BIN="$ROOT/target/debug/flagstone"
fi

# The three example plugins, built from source for wasm32-wasip2.
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
(cd "$ROOT" && cargo build -q --target wasm32-wasip2 --profile plugin --target-dir target/plugins \
  -p flag-schema -p rollout -p audit)
mkdir -p "$WORK/plugins"
cp "$ROOT"/target/plugins/wasm32-wasip2/plugin/{flag_schema,rollout,audit}.wasm "$WORK/plugins/"

# Starts node N in the background (port 0: the OS picks a free port) and
# records its PID; not run in a subshell, so the cleanup trap sees every PID.
start_node() {
  local id=$1; shift
  "$BIN" serve --id "$id" --listen 127.0.0.1:0 --data-dir "$WORK/node-$id" \
    --plugins-dir "$WORK/plugins" "$@" \
    >"$WORK/node-$id.out" 2>"$WORK/node-$id.log" &
  PIDS+=($!)
}

# Prints the URL node N announced on its first stdout line.
node_url() {
  for _ in $(seq 1 100); do
    if [[ -s "$WORK/node-$1.out" ]]; then
      awk '{print $NF; exit}' "$WORK/node-$1.out"
      return 0
    fi
    sleep 0.05
  done
  fail "node-$1 did not start"
}

start_node 1
URL1=$(node_url 1)
start_node 2 --join "$URL1"
start_node 3 --join "$URL1"
URL2=$(node_url 2)
URL3=$(node_url 3)
URLS=("$URL1" "$URL2" "$URL3")
echo "Started node-1 ($URL1), node-2 ($URL2), node-3 ($URL3)"

# Wait until every node sees the same leader and three voters.
for _ in $(seq 1 200); do
  views=""
  for u in "${URLS[@]}"; do
    views+="$(curl -sf "$u/v1/cluster" | json 'd["leader_id"], sum(m["voter"] for m in d["members"])' 2>/dev/null || echo none) "
  done
  set -- $views
  if [[ "$1 $2" != "none" && "$*" == "$1 $2 $1 $2 $1 $2" && "$2" == "3" ]]; then break; fi
  sleep 0.1
done
[[ "$2" == "3" ]] || fail "cluster did not form: $views"
echo "Cluster formed: leader is node-$1, 3 voters"

FEATURE_FLAGS='{"new_ui":true,"beta_feature":false,"dark_mode":true}'
APP_CONFIG='{"max_connections":100,"timeout_seconds":30,"api_version":"v2"}'
GLOBAL_COUNTER='{"request_count":0}'

echo
echo "node-1 stores the custom data:"
for kv in "feature_flags|$FEATURE_FLAGS" "app_config|$APP_CONFIG" "global_counter|$GLOBAL_COUNTER"; do
  key=${kv%%|*}; value=${kv#*|}
  rev=$(curl -sf -X PUT "$URL1/v1/kv/$key" -H 'content-type: application/json' --data-raw "$value" | json 'd["revision"]') \
    || fail "storing $key on node-1"
  echo "  $key = $value (revision $rev)"
done

echo
echo "Every node reads the data back (local reads):"
for i in 1 2 3; do
  u=${URLS[$((i-1))]}
  for key in feature_flags app_config global_counter; do
    got=""
    for _ in $(seq 1 100); do
      got=$(curl -sf "$u/v1/kv/$key" || true)
      [[ -n "$got" ]] && break
      sleep 0.05
    done
    [[ -n "$got" ]] || fail "node-$i never saw $key: replication did not happen"
    echo "$got" > "$WORK/read-$i-$key"
  done
  flags=$(cat "$WORK/read-$i-feature_flags")
  echo "  node-$i:"
  echo "$flags" | json '"\n".join("    %s is %s" % (n, "ENABLED" if d[k] else "DISABLED") for k, n in [("new_ui","New UI"),("beta_feature","Beta feature"),("dark_mode","Dark mode")])'
  json '"    max_connections=%s timeout_seconds=%s api_version=%s" % (d["max_connections"], d["timeout_seconds"], d["api_version"])' < "$WORK/read-$i-app_config"
done

for key in feature_flags app_config global_counter; do
  for i in 2 3; do
    cmp -s "$WORK/read-1-$key" "$WORK/read-$i-$key" \
      || fail "node-$i returned a different $key: $(cat "$WORK/read-$i-$key") vs $(cat "$WORK/read-1-$key")"
  done
done
echo "All three nodes returned identical values."

# The flag-schema validator plugin refuses a malformed write before it is
# proposed, whichever node receives it; nothing changes anywhere.
echo
echo "node-2 tries to store feature_flags with \"new_ui\":\"yes\" (not a boolean):"
code=$(curl -s -o "$WORK/rejected" -w '%{http_code}' -X PUT "$URL2/v1/kv/feature_flags" \
  -H 'content-type: application/json' --data-raw '{"new_ui":"yes","beta_feature":false,"dark_mode":true}')
[[ "$code" == "422" ]] || fail "malformed feature_flags was not rejected (HTTP $code)"
echo "  HTTP $code: $(json '"rejected by %s: %s" % (d["error"]["plugin"], d["error"]["message"])' < "$WORK/rejected")"
for i in 1 2 3; do
  got=$(curl -sf "${URLS[$((i-1))]}/v1/kv/feature_flags?consistency=linearizable")
  [[ "$got" == "$FEATURE_FLAGS" ]] || fail "node-$i changed after a rejected write: $got"
done
echo "  feature_flags is unchanged on all three nodes."

# Every node evaluates the flags through the rollout plugin (OpenFeature shape).
echo
for i in 1 2 3; do
  ev=$(curl -sf -X POST "${URLS[$((i-1))]}/v1/flags/dark_mode/evaluate" -H 'content-type: application/json' \
    --data-raw '{"context":{"targetingKey":"user-42"}}' | json '"%s %s (%s)" % (d["key"], json.dumps(d["value"]), d["reason"])')
  echo "node-$i evaluates $ev"
  [[ "$ev" == "dark_mode true (STATIC)" ]] || fail "node-$i evaluated dark_mode as $ev"
done

# Increment the global counter from all three nodes at once, each with
# compare-and-set (If-Match: <revision>), retrying on 412 conflicts.
PER_NODE=${PER_NODE:-10}
increment() {
  local u=$1 tmp="$WORK/body-$2" n=0 conflicts=0
  while (( n < PER_NODE )); do
    local etag body next code
    etag=$(curl -sf -D - -o "$tmp" "$u/v1/kv/global_counter?consistency=linearizable" \
      | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
    body=$(cat "$tmp")
    next=$(echo "$body" | json 'json.dumps({"request_count": d["request_count"] + 1}, separators=(",",":"))')
    code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "$u/v1/kv/global_counter" \
      -H "If-Match: $etag" -H 'content-type: application/json' --data-raw "$next")
    case $code in
      200) n=$((n+1)) ;;
      412) conflicts=$((conflicts+1)) ;;
      *) echo "unexpected status $code" >&2; return 1 ;;
    esac
  done
  echo "$conflicts"
}
echo
echo "Incrementing global_counter $PER_NODE times from each node with compare-and-set..."
CPIDS=()
for i in 1 2 3; do
  increment "${URLS[$((i-1))]}" "$i" > "$WORK/conflicts-$i" &
  CPIDS+=($!)
done
for i in 1 2 3; do
  wait "${CPIDS[$((i-1))]}" || fail "incrementing from node-$i"
  echo "  node-$i: $PER_NODE increments, $(cat "$WORK/conflicts-$i") conflicts retried"
done
EXPECTED=$((3 * PER_NODE))
for i in 1 2 3; do
  count=$(curl -sf "${URLS[$((i-1))]}/v1/kv/global_counter?consistency=linearizable" | json 'd["request_count"]')
  [[ "$count" == "$EXPECTED" ]] || fail "node-$i sees request_count=$count, expected $EXPECTED (lost update)"
done
echo "global_counter.request_count = $EXPECTED on every node: no lost update."
echo
echo "OK: custom data replicated to all 3 nodes."
