#!/usr/bin/env bash
# qconvert bench on one GPU (H100/H200): FLUX.1-dev's real architecture with random weights,
# bf16 against nvfp4 / mxfp8 / fp8 quantized in memory, compile_repeated_blocks(fullgraph=True),
# batch 1 and 4, transformer step and end to end (28 steps, 1024²). No download, no files.
# Step: median and spread of 8 calls after 2 warm-up calls; end to end: 1 timed call after a
# 2-step warm-up (28 steps average out). Each batch size is compiled afresh (static shapes).
# Writes OUTDIR/speed.json after every pipeline (a run cut short keeps what it measured) and
# OUTDIR/bench.log. Estimated 6-7 minutes on an H100-class GPU (not yet run).
#
#   benchmarks/bench_gpu.sh OUTDIR
set -euo pipefail
out=${1:?usage: benchmarks/bench_gpu.sh OUTDIR}
mkdir -p "$out"
python=${PYTHON:-python}
start=$(date +%s)
"$python" -m qconvert bench flux --real-shape --format nvfp4,mxfp8,fp8 --device cuda \
    --compile --batch 1,4 --repeats 8 --warmup 2 --e2e-repeats 1 --results "$out" -q \
    2>&1 | tee "$out/bench.log"
echo "bench_gpu.sh: $(($(date +%s) - start)) s; results in $out/speed.json" | tee -a "$out/bench.log"
