#!/usr/bin/env bash
# One device call = one stage, so a lease of ~30 minutes covers the GPU work of a session:
#   benchmarks/gpu_session.sh tests|lora|bench|load|eval|pending   (results under $OUT, or ./gpu-out)
# Installs the carried wheels (.whl: diffusers, torchao, peft) into /tmp/site first.
set -uo pipefail
stage=${1:?stage}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu-$stage.txt"
python3 -c "import torch, torchao, diffusers, triton, peft; print('torch', torch.__version__, \
'torchao', torchao.__version__, 'diffusers', diffusers.__version__, 'triton', triton.__version__, \
'peft', peft.__version__)" 2>&1 | grep -v Warn | tail -1 | tee -a "$out/gpu-$stage.txt"
case $stage in
  tests)
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
      tests/test_fp8_runtime.py tests/test_fastload_gpu.py 2>&1 | tee "$out/gpu_tests_h200.txt" | tail -15
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_lora.py -k gpu \
      2>&1 | tee "$out/gpu_tests_lora_h200.txt" | tail -15 ;;
  lora)
    timeout 280 python3 benchmarks/lora_step.py --json "$out/lora_step_h200.json" 2>&1 | tail -30 ;;
  bench)
    timeout 560 bash benchmarks/bench_gpu.sh "$out/bench" 2>&1 | tail -40 ;;
  load)
    timeout 420 python3 benchmarks/load_speed.py --workdir /tmp/qload --json "$out/load_speed_h200.json" \
      --budget "${LOAD_BUDGET:-400}" 2>&1 | tail -30 ;;
  pending)  # what the 2026-12-01 H200 session left: the fp8 q/k/v-LoRA compile fix, fp8/mxfp8 loads
    timeout 120 python3 benchmarks/repro_fp8_lora.py 2>&1 | grep -v Warn | tail -5
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_runtime.py \
      -k "compiled_slices or fused_projections" 2>&1 | tee "$out/gpu_tests_pending_h200.txt" | tail -3
    timeout 110 python3 benchmarks/lora_step.py --paths bf16 fp8 --json "$out/lora_step_fp8_h200.json" \
      2>&1 | grep -v Warn | tail -4
    timeout 280 python3 benchmarks/load_speed.py --workdir /tmp/qload --formats fp8 mxfp8 \
      --json "$out/load_speed_fp8_mxfp8_h200.json" --budget 270 2>&1 | tail -12 ;;
  eval)
    timeout 230 python3 -m qconvert eval flux --real-shape --format nvfp4,mxfp8,fp8 --device cuda \
      --num-prompts 2 --results "$out/eval" --cache-dir /tmp/evalcache -q 2>&1 | tee "$out/eval.log" | tail -20 ;;
esac
echo "stage $stage done"
