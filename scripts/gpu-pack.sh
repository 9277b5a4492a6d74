#!/usr/bin/env bash
# Packs what a GPU check needs into .gpu/ (git-ignored: add `.gpu/` to
# .git/info/exclude):
# - .gpu/bundle.tgz: stripped release binaries of kestrel and of the CUDA test
#   programs (bin/), and the kernel module compiled for sm_90 (kcache/, a
#   cubin named by the source's cache key; point KESTREL_KERNEL_CACHE at it on
#   the device and a fresh machine skips two and a half minutes of NVRTC and
#   driver JIT). The cubin is made with NVRTC and ptxas 13.0 (the device's
#   CUDA), installed from pip into /tmp when missing;
# - .gpu/model/xa?: the default model in 30 MB pieces (a device call carries
#   at most 64 MiB, the ~33 MB tree included).
# On the device: one call per piece (`mkdir -p /root/models && mv
# .gpu/model/xaN /root/models/`, carry [".gpu/model/xaN"]), back to back
# while the machine is warm; then a call carrying .gpu/bundle.tgz runs
# `tar xzf .gpu/bundle.tgz -C .gpu && B=.gpu/bin bash scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kestrel-cli
cargo test --release --no-run 2>/dev/null
rm -rf .gpu/bin .gpu/kcache && mkdir -p .gpu/bin .gpu/kcache .gpu/model
cp target/release/kestrel .gpu/bin/
for t in kestrel_backend cuda_overlap cuda_consistency cuda_megakernel cuda_reference cuda_sampling cuda_memory; do
  f=$(ls -t target/release/deps/${t}-* | grep -v '\.d$' | head -1)
  cp "$f" .gpu/bin/$t
done
strip .gpu/bin/*
nvrtc=/tmp/nvrtc130/nvidia/cu13/lib ptxas=/tmp/nvcc130/nvidia/cu13/bin/ptxas
[ -f $nvrtc/libnvrtc.so.13 ] || pip install -q --target /tmp/nvrtc130 "nvidia-cuda-nvrtc==13.0.*"
[ -x $ptxas ] || pip install -q --target /tmp/nvcc130 "nvidia-cuda-nvcc==13.0.*"
KESTREL_PTX_OUT=/tmp/kestrel.ptx LD_LIBRARY_PATH=$nvrtc \
  cargo test --release -p kestrel-backend compile::tests::kernels_compile_with_nvrtc > /dev/null
$ptxas -arch=sm_90 /tmp/kestrel.ptx -o ".gpu/kcache/$(cat /tmp/kestrel.ptx.key)-sm_90.cubin"
# The diagnostic build with attention phase stamps (KESTREL_TRACE=1, cuda/trace.rs).
KESTREL_TRACE=1 KESTREL_PTX_OUT=/tmp/kestrel-trace.ptx LD_LIBRARY_PATH=$nvrtc \
  cargo test --release -p kestrel-backend compile::tests::kernels_compile_with_nvrtc > /dev/null
$ptxas -arch=sm_90 /tmp/kestrel-trace.ptx -o ".gpu/kcache/$(cat /tmp/kestrel-trace.ptx.key)-sm_90.cubin"
tar czf .gpu/bundle.tmp -C .gpu bin kcache && mv .gpu/bundle.tmp .gpu/bundle.tgz
model=$(bash scripts/fetch-model.sh | tail -1 | sed "s/^[^:]*: //")
# The model's header (metadata, tokenizer) for a random-weight copy made on
# the device (scripts/gpu-branch-check.sh): timing runs need no upload.
head -c 6525120 "$model" > .gpu/dhdr
# Pieces cut earlier at another size (37 MB once) would not fit: cut again.
piece=30000000
if [ "$(stat -c %s .gpu/model/xaa 2>/dev/null)" != "$piece" ]; then
  rm -f .gpu/model/xa?
  (cd .gpu/model && split -b $piece "$model")
fi
du -sh .gpu/bundle.tgz .gpu/model
