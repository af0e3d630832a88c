#!/usr/bin/env bash
# The README's test command: installs what it needs, builds everything
# (host, guest SDK, plugins for wasm32-wasip2), checks formatting and lints,
# runs every test and the 3-node custom-data example.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A fresh clone gains nothing from incremental caches (2.5 GB of them).
export CARGO_INCREMENTAL=0

step() { printf '\n==> %s\n' "$*"; }

step "toolchain and system packages"
rustup target add wasm32-wasip2
rustup component add rustfmt clippy 2>/dev/null || true
# make and gcc build jemalloc (tikv-jemalloc-sys), the binary's allocator.
missing=()
for tool in curl python3 make gcc; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi

step "plugins (wasm32-wasip2, built from source)"
cargo build --locked --target wasm32-wasip2 --profile plugin --target-dir target/plugins \
  -p flag-schema -p rollout -p audit -p looper -p membomb -p trapper -p escaper

step "format"
cargo fmt --all --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
cargo test --workspace --locked

step "example: examples/custom-data/run.sh"
bash examples/custom-data/run.sh
