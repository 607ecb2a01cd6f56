#!/usr/bin/env bash
# One prepared GPU pass: GPU tests (the quick demo on the GPU among them) + the three benchmarks
# on CUDA, results under $OUT.
# Usage on the device machine (repo root):  bash benchmarks/gpu_check.sh [STEP ...]
# Run it with the device tool: command "bash benchmarks/gpu_check.sh", carry [".whl"],
# timeout 600. bench_ntk's curvlinops section (4) needs the pure-Python wheels in ./.whl (the
# device image lacks curvlinops, backpack-for-pytorch, einconv, unfoldNd): here,
# `pip download --no-deps -d .whl curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
# einconv==0.1.0 unfoldNd==0.2.3`; without them that section prints "skipped".
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning, timm, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run() {  # run NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name"; local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  echo "rc=$rc wall=$(( $(date +%s) - t0 ))s" | tee -a "$OUT/$name.txt"
  tail -n 40 "$OUT/$name.txt"
}
# Steps (all by default, or those named on the command line), ordered by what only a GPU can
# tell; each has its own time cap (under 10 minutes in all; bench_ntk's cap went from 90 s to
# 150 s when section 4 began to sweep eigsh tols and take the best of 3 after a warm-up).
# The default is what a lease of 15 device minutes can re-check (caps 560 s; walls on an H200,
# 2026-11-28 session 17: 34 + 16 + 16 + ~95 + 42 + 60 s, plus ~35 s to start the machine; since
# session 21 ab_mlp_bias times a fourth layout, split-autograd, and fused_acc checks it: ~+20%): the
# GPU tests, the fused block's accuracy in both layouts (bf16, and fp16 at 16,500 tokens, where
# cuBLAS may split the inner dimension of the dW1 GEMM that yields the feature-major bias
# gradient), the biased bf16 layouts across widths (ab_mlp_bias: the measurement behind
# SPLIT_BELOW_IN_FEATURES, issue #2), the MLP speed with biases, then NTK sections 1, 2 and 4
# (NTK_SECTIONS to change).
# On request: bench_callbacks (GPT-2-small pair, ~100 s), bench_mlp_cpu16, bench_mlp_bf16 /
# bench_mlp_amp (bias-free bf16), profile_mlp_bias (kernel tables at dim 768 with biases).
steps=${*:-gpu_tests fused_acc fused_acc_long ab_mlp_bias bench_mlp_bias bench_ntk}
for step in $steps; do
  case $step in
    gpu_tests) run gpu_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
      tests/test_krylov.py tests/test_callbacks_ntk.py ;;
    fused_acc) run fused_acc 40 python3 benchmarks/fused_accuracy.py --device cuda --seeds 2 ;;
    fused_acc_long) run fused_acc_long 40 python3 benchmarks/fused_accuracy.py --device cuda \
      --seeds 1 --dtype float16 --batch 500 ;;
    bench_callbacks) run bench_callbacks 200 python3 benchmarks/bench_callbacks.py --device cuda \
      --repeats 1 --gpu-steps 200 ;;
    bench_ntk) run bench_ntk 150 python3 benchmarks/bench_ntk.py --device cuda \
      --sections "${NTK_SECTIONS:-1,2,4}" ;;
    bench_mlp_bf16) run bench_mlp_bf16 45 python3 benchmarks/bench_mlp.py --device cuda \
      --dtype bfloat16 --tokens 16384 --dims 768 2048 --min-run-time 0.3 ;;
    bench_mlp_bias) run bench_mlp_bias 60 python3 benchmarks/bench_mlp.py --device cuda \
      --dtype bfloat16 --bias --tokens 16384 --dims 768 2048 --min-run-time 0.2 --rounds 5 ;;
    profile_mlp_bias) run profile_mlp_bias 45 python3 benchmarks/bench_mlp.py --device cuda \
      --dtype bfloat16 --bias --tokens 16384 --dims 768 --min-run-time 0.2 --rounds 3 --profile ;;
    ab_mlp_bias) run ab_mlp_bias 150 python3 benchmarks/ab_mlp_bias.py --device cuda ;;
    bench_mlp_amp) run bench_mlp_amp 60 python3 benchmarks/bench_mlp.py --device cuda \
      --autocast bfloat16 --tokens 16384 --dims 768 2048 --min-run-time 0.2 --rounds 5 ;;
    bench_mlp_cpu16) run bench_mlp_cpu16 90 python3 benchmarks/bench_mlp.py --device cpu \
      --threads 16 --dims 256 512 --min-run-time 0.2 --rounds 2 ;;
    *) echo "unknown step $step" ;;
  esac
done
# Walls on an H100, 2026-11-28 (session 14, 307 s in all, machine start ~40 s more): fused_acc
# 21 s, gpu_tests 30 s, bench_mlp_bias >45 s (table complete), bench_ntk 87 s, bench_callbacks
# 51 s (stopped by the budget bug then), bench_mlp_cpu16 >50 s (nothing printed; now smaller).
# Run 2026-11-27 on an H100 (figures in RESULTS_ntk.md §5, RESULTS_mlp.md):
#   python3 benchmarks/bench_ntk.py --device cuda --sections 5       (~30 s)
#   python3 benchmarks/bench_mlp.py --device cuda --min-run-time 0.3 (fp32, ~60 s)
exit 0
