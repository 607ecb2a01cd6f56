#!/usr/bin/env bash
# Re-make docs/img/dashboard.png from a demo run: TensorBoard on localhost + headless Chromium.
# Usage: bash docs/dashboard_screenshot.sh RUN_DIR   (e.g. runs/demo-...; needs `chromium`)
set -euo pipefail
run=${1:?usage: $0 RUN_DIR}
port=6123
tensorboard --logdir "$run" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
tb=$!
trap 'kill $tb' EXIT
sleep 15
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1100 \
  --virtual-time-budget=20000 --screenshot=/tmp/glu_probe_dashboard.png \
  "http://127.0.0.1:$port/#custom_scalars"
python - <<'PY'
from PIL import Image
Image.open("/tmp/glu_probe_dashboard.png").crop((0, 0, 1600, 780)).save("docs/img/dashboard.png", optimize=True)
PY
echo "wrote docs/img/dashboard.png"
