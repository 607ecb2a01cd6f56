#!/usr/bin/env bash
# One prepared GPU pass: GPU tests (the quick demo on the GPU among them) + the three benchmarks
# on CUDA, results under $OUT.
# Usage on the device machine (repo root):  bash benchmarks/gpu_check.sh
# Needs the pure-Python wheels for curvlinops in ./.whl (the device image lacks curvlinops,
# backpack-for-pytorch, einconv, unfoldNd): `pip download --no-deps -d .whl NAME==VER` here, then
# run it with the device tool: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout 600.
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
run gpu_tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_krylov.py tests/test_callbacks_ntk.py
run bench_mlp 60 python3 benchmarks/bench_mlp.py --device cuda
run bench_ntk 200 python3 benchmarks/bench_ntk.py --device cuda
run bench_callbacks 150 python3 benchmarks/bench_callbacks.py --device cuda --gpu-steps 100
exit 0
