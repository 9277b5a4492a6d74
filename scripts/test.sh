#!/usr/bin/env bash
# kestrel's test suite: what CI runs (.ci/run calls this) and what the README
# tells you to run. Fetches the default model first (the reference tests
# compare its output with llama.cpp's), then checks formatting and lints and
# runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-model.sh
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
# The server against the official `openai` Python client (installs openai
# and pytest into a venv under target/).
cargo build --release -p kestrel-cli
tests/python/run.sh
