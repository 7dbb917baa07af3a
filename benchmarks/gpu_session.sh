#!/usr/bin/env bash
# One device call = one stage, so a lease of ~30 minutes covers the GPU work of a session:
#   benchmarks/gpu_session.sh tests|lora|bench|load|eval   (results under $OUT, or ./gpu-out)
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
  eval)
    timeout 230 python3 -m qconvert eval flux --real-shape --format nvfp4,mxfp8,fp8 --device cuda \
      --num-prompts 2 --results "$out/eval" --cache-dir /tmp/evalcache -q 2>&1 | tee "$out/eval.log" | tail -20 ;;
esac
echo "stage $stage done"
