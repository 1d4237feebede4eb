#!/usr/bin/env bash
# The GPU check for a session whose task is lent a device machine (see the device tool):
# CUDA backend tests, then the overhead and call benchmarks on the cuda backend, all output
# under $OUT. Runs in about 6 minutes on one H100/H200. Usage there:
#   bash scripts/device-check.sh
set -uo pipefail
OUT=${OUT:-/tmp/flexnpu-device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/card.txt"
python3 -m pip install -q --no-build-isolation -e ".[test]" >"$OUT/install.log" 2>&1 || python3 setup.py build_ext --inplace -q
timeout 240 python3 -m pytest -q tests/test_cuda_backend.py tests/test_daemon.py 2>&1 | tee "$OUT/tests.log"
timeout 240 python3 -m flexnpu bench overhead --backend cuda --json > "$OUT/overhead-cuda.json" 2> "$OUT/overhead-cuda.err"
timeout 120 python3 -m flexnpu bench call --quick --json > "$OUT/call.json" 2> "$OUT/call.err"
tail -n 30 "$OUT"/*.json
