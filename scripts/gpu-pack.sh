#!/usr/bin/env bash
# Packs what a GPU check needs into .gpu/ (git-ignored: add `.gpu/` to
# .git/info/exclude): stripped release binaries of kestrel and of the CUDA
# test programs in .gpu/bin, and the default model in 32 MiB pieces in
# .gpu/model (a device call carries at most 64 MiB, the tree included).
# On the device: one call per piece (`mkdir -p /root/models && mv
# .gpu/model/xaN /root/models/`, carry [".gpu/model/xaN"]), back to back
# while the machine is warm; the last call carries .gpu/bin as well and runs
# `bash scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kestrel-cli
cargo test --release --no-run 2>/dev/null
rm -rf .gpu/bin && mkdir -p .gpu/bin .gpu/model
cp target/release/kestrel .gpu/bin/
for t in kestrel_backend cuda_overlap cuda_consistency cuda_megakernel; do
  f=$(ls -t target/release/deps/${t}-* | grep -v '\.d$' | head -1)
  cp "$f" .gpu/bin/$t
done
strip .gpu/bin/*
model=$(bash scripts/fetch-model.sh | tail -1 | sed "s/^[^:]*: //")
if [ ! -f .gpu/model/xaa ]; then
  (cd .gpu/model && split -b 32M "$model")
fi
du -sh .gpu/bin .gpu/model
