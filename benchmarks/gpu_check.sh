#!/usr/bin/env bash
# One-shot GPU check (one H200, <= 8 minutes): the Triton kernel tests on CUDA (tests/test_triton_kernels.py
# with LUKV_TEST_DEVICE=cuda: triton_decode_attention vs reference.segment_attention on RaggedStore layouts,
# triton_window_attention_mean + scorers.snapkv vs torch SnapKV, the eviction's GPU scorer), then the decode microbenchmark
# (benchmarks/gpu_check.py: triton_decode_attention over a RaggedStore vs flash SDPA over the full cache at
# 8k/32k/128k), then the end-to-end bench on CUDA (`lukv bench --device cuda --dtype bfloat16 --mode
# reduce-overhead --weights random`: SmolLM2's architecture with random weights, as the model package cannot be
# installed there; lukv with CUDA graphs between its attention calls vs plain eager and transformers'
# StaticCache + torch.compile with the same mode). Results land in $OUT (default benchmarks/gpu_out):
# pytest.log, gpu_check.json, bench.log, bench_e2e_cuda.json, e2e.log; budget 150 + 120 + 210 s.
# Usage (from anywhere): bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_out}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_FORCE_DISABLE_CACHES=1
unset TRITON_INTERPRET  # the tests must compile for the GPU, not interpret

echo "== environment"
if ! "$PYTHON" - <<'PY'
import sys
missing = []
for name in ("torch", "triton", "pytest", "hypothesis", "transformers"):
    try:
        __import__(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("missing Python packages: " + ", ".join(missing))
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: nothing to check")
print("device", torch.cuda.get_device_name(0))
PY
then
    echo "gpu_check: environment not usable (see above)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true

echo "== kernel tests on CUDA (limit 150 s)"
LUKV_TEST_DEVICE=cuda timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_triton_kernels.py \
    2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}

echo "== decode microbenchmark (limit 120 s)"
timeout 120 "$PYTHON" benchmarks/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== end-to-end bench on CUDA, bf16, reduce-overhead (limit 210 s)"
timeout 210 "$PYTHON" -m lukv_compile.tools.cli bench --device cuda --dtype bfloat16 --mode reduce-overhead \
    --weights random --contexts 4096,8192 --threads default --steps 20 --e2e-tokens 64 \
    --json "$OUT/bench_e2e_cuda.json" 2>&1 | tee "$OUT/e2e.log"
e2e_rc=${PIPESTATUS[0]}
[ -f "$OUT/bench_e2e_cuda.json" ] && "$PYTHON" benchmarks/bench_table.py "$OUT/bench_e2e_cuda.json" | tee -a "$OUT/e2e.log"

echo "== summary: tests rc=$tests_rc (124 = timed out), benchmark rc=$bench_rc, end-to-end rc=$e2e_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$e2e_rc" -eq 0 ]
