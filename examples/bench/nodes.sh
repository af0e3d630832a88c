# Shared by the catch-up scripts here (sourced, not run): flagstone nodes on
# 127.0.0.1 in a temp dir, stopped (only they) and removed on exit.
#
# Before sourcing: BIN (the flagstone binary), NAME (temp dir name).
[[ -x "$BIN" ]] || { echo "no flagstone binary at $BIN (cargo build --release -p flagstone)" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flagstone-$NAME.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# start ID LISTEN [ARGS...]: node ID in the background (data in
# $WORK/node-ID, first stdout line in $WORK/ID.out, log appended to
# $WORK/ID.log); PIDS[ID] is its PID.
start() {
  local id=$1 listen=$2; shift 2
  rm -f "$WORK/$id.out"
  "$BIN" serve --id "$id" --listen "$listen" --data-dir "$WORK/node-$id" "$@" \
    >"$WORK/$id.out" 2>>"$WORK/$id.log" &
  PIDS[id]=$!
}

# url ID: the URL node ID announced (waits up to 5 s).
url() {
  for _ in $(seq 1 100); do
    [[ -s "$WORK/$1.out" ]] && { awk '{print $NF; exit}' "$WORK/$1.out"; return 0; }
    sleep 0.05
  done
  echo "node $1 did not start" >&2; exit 1
}

# peak_mib PID: the process's peak resident memory, MiB.
peak_mib() { awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }
