#!/usr/bin/env bash
# Create .venv (if missing) and install stmt-monai for CPU: torch pinned to the CPU wheel
# through requirements-cpu.txt (an unpinned torch pulls a multi-GB CUDA build), and OpenVINO + NNCF,
# the CPU fast path that stmt-segment's default backend (auto) picks.
# With a GPU, install instead: pip install -e . (pyproject keeps a torch range).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-cpu.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
