#!/usr/bin/env bash
# The GPU check for a session whose task is lent a device machine (see the device tool):
# CUDA backend tests, then the overhead and call benchmarks on the cuda backend, all output
# under $OUT, then the green-context probe and a cuda serving run (static partition vs flex).
# Runs in about 12 minutes on one H100/H200. Usage there:
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
# Core partitions on hardware: green-context probe (time vs SM share, whether two contexts are
# disjoint, the cost of a change), then the serving comparison on the cuda backend: a
# Qwen2.5-7B-shaped engine (random weights) as prefill + decode processes on one GPU, the static
# core split (green contexts at alpha / 1 - alpha) against flex (shares changed at operator
# boundaries) and naive co-location.
timeout 180 python3 -m flexnpu.bench.greenctx --json > "$OUT/greenctx.json" 2> "$OUT/greenctx.err"
timeout 420 python3 -m flexnpu bench serve --realtime --backend cuda --devices 1 --quick --json \
    --systems static-partition,naive-coloc,flexnpu --alphas 0.625,0.75 --requests 16 \
    > "$OUT/serve-cuda.json" 2> "$OUT/serve-cuda.err"
tail -n 40 "$OUT"/greenctx.json "$OUT"/serve-cuda.json
