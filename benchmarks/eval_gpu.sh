#!/usr/bin/env bash
# qconvert eval on one GPU (H100/H200): FLUX.1-dev's real architecture with random weights at its
# seed settings (1024², 28 steps, guidance 3.5), 2 prompts, bf16 against nvfp4, mxfp8 and fp8
# quantized in memory. The bf16 images are generated once and reused from the cache for the
# second and third format. Random weights make the quality figures meaningless; the time per
# prompt is real (prompt embeddings are precomputed: text encoding is not timed). Needs
# torchmetrics (pip install "qconvert[eval]"; offline: WHEELS=DIR holding the torchmetrics and
# lightning_utilities wheels, installed from there); LPIPS says in one line why it is skipped when
# torchvision's AlexNet weights cannot be downloaded. About 2-3 minutes.
#
#   [WHEELS=DIR] benchmarks/eval_gpu.sh OUTDIR
set -euo pipefail
out=${1:?usage: benchmarks/eval_gpu.sh OUTDIR}
mkdir -p "$out"
python=${PYTHON:-python}
if ! "$python" -c "import torchmetrics" 2>/dev/null; then
    if [ -z "${WHEELS:-}" ]; then
        echo "eval_gpu.sh: torchmetrics is missing: pip install 'qconvert[eval]', or WHEELS=DIR" >&2
        exit 1
    fi
    "$python" -m pip install -q --no-index --no-deps "$WHEELS"/torchmetrics-*.whl \
        "$WHEELS"/lightning_utilities-*.whl
fi
start=$(date +%s)
for fmt in nvfp4 mxfp8 fp8; do
    t=$(date +%s)
    "$python" -m qconvert eval flux --real-shape --format "$fmt" --device cuda \
        --num-prompts 2 --results "$out/$fmt" --cache-dir "$out/cache" -q \
        2>&1 | tee "$out/eval-$fmt.log"
    echo "eval_gpu.sh: $fmt took $(($(date +%s) - t)) s" | tee -a "$out/eval-$fmt.log"
done
rm -rf "$out/cache"
echo "eval_gpu.sh: $(($(date +%s) - start)) s; results in $out/*/quality.json" | tee "$out/eval.log"
