#!/usr/bin/env bash
# Create .venv-monailabel (if missing) for the MONAI Label app in apps/monailabel: monailabel 0.8.5
# with a matching torch/torchvision pair (apps/monailabel/requirements.txt), the project's other
# pins from requirements-cpu.txt, and stmt-monai itself (editable). Separate from .venv: left out of
# the project's pins are torch (the pair replaces the CPU wheel), numpy and jsonschema (monailabel
# 0.8.5 needs numpy<2 through numpymaxflow and pydicom-seg, and jsonschema<4 through pydicom-seg),
# pydicom and highdicom (pydicom-seg needs pydicom<3, highdicom pydicom>=3; the server's DICOM SEG is
# MONAI Label's own), and the test-only packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-monailabel}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
grep -v -E '^(torch|numpy|jsonschema|pytest|surface-distance|pydicom|highdicom)==' requirements-cpu.txt > "$pins"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r apps/monailabel/requirements.txt -r "$pins"
"$VENV/bin/python" -m pip install -q --no-deps -e .
