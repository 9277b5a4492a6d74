#!/usr/bin/env bash
# The standard GPU check, run on the device machine from the repository
# root after scripts/gpu-pack.sh's pieces are in /root/models: the
# batch curve, the CUDA tests, the server at 64 and 1 streams, tg128/pp512
# and validate, each with its own time limit so that a slow step cannot eat
# the rest. Capsules and the log go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
M=/root/models/m.gguf
[ -f $M ] || cat /root/models/xa? > $M
sha256sum $M | cut -c1-16
export KESTREL_MODEL=$M
# Kernels compiled ahead by scripts/gpu-pack.sh (a fresh machine skips NVRTC and the JIT).
[ -d .gpu/kcache ] && export KESTREL_KERNEL_CACHE=$PWD/.gpu/kcache
B=${B:-.gpu/bin}
K=$B/kestrel
echo "== warm-up: the first process compiles the kernels (a minute or more on a fresh machine)"
timeout 300 $K bench $M --device cuda --pp 0 --runs 1 | grep "tok/s"
echo "== batch curve"
timeout 150 $K bench $M --device cuda --batch 1,8,32,64,128,256 --runs 3 --out $OUT/batch-curve.json | grep -v '^loaded'
echo "== CUDA tests"
timeout 120 $B/kestrel_backend cuda 2>&1 | grep -E "FAIL|panicked|test result"
for t in cuda_megakernel cuda_consistency cuda_overlap cuda_memory; do
  timeout 90 $B/$t --nocapture 2>&1 | grep -E "test result|panicked|overlapped|SKIP"
done
echo "== serve"
$K serve $M --device cuda --port 8080 > $OUT/serve.log 2>&1 & SP=$!
for i in $(seq 1 60); do curl -sf localhost:8080/health > /dev/null && break; sleep 1; done
timeout 60 $K bench-serve --url http://127.0.0.1:8080 --concurrency 64 --num-prompts 256 --input-len 100 --output-len 128 --ignore-eos --out $OUT/serve-c64.json | grep -E "requests|TTFT|TPOT"
timeout 40 $K bench-serve --url http://127.0.0.1:8080 --concurrency 1 --num-prompts 32 --input-len 100 --output-len 128 --ignore-eos --out $OUT/serve-c1.json | grep -E "requests|TTFT|TPOT"
kill -INT $SP; sleep 1
echo "== tg128 / pp512"
timeout 60 $K bench $M --device cuda --runs 3 --out $OUT/bench-tg-pp.json | grep "tok/s"
echo "== validate"
timeout 150 $K validate $M --baseline cuda-reference --candidate cuda --out $OUT/validate.json | tail -3
