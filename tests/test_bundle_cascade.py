"""bundles/cascade: metadata, and its docs/README.md inference command run as written."""

import json
import re
import shlex
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from cascade_helpers import REPO, random_bundles
from monai.bundle import verify_metadata

from stmt_monai.io import load_image
from stmt_monai.labels import ALL_CHANNELS

BUNDLE = REPO / "bundles" / "cascade"
SCHEMA = REPO / "stmt_monai" / "resources" / "meta_schema_20240725.json"


def test_metadata_is_valid_and_channels_come_from_labels():
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {str(k): v for k, v in ALL_CHANNELS.items()}
    assert pred["num_channels"] == len(ALL_CHANNELS)


def readme_run_command() -> list[str]:
    text = (BUNDLE / "docs" / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            args = shlex.split(command)
            if args[:4] == ["python", "-m", "monai.bundle", "run"]:
                return [sys.executable, *args[1:]]
    raise AssertionError("no 'python -m monai.bundle run' command in docs/README.md")


def with_overrides(args: list[str], **overrides: str) -> list[str]:
    """``args`` with each ``--key value`` replaced (or appended)."""
    args = list(args)
    for key, value in overrides.items():
        if f"--{key}" in args:
            args[args.index(f"--{key}") + 1] = value
        else:
            args += [f"--{key}", value]
    return args


@pytest.mark.slow
def test_readme_command_segments_a_folder_and_fails_on_a_bad_case(tmp_path, real_ct):
    bundles = random_bundles(tmp_path / "bundles")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "case_0000.nii.gz").write_bytes(real_ct.read_bytes())
    (inputs / "broken.nii.gz").write_text("not an image")
    args = with_overrides(readme_run_command(), bundles_dir=str(bundles), input=str(inputs), output_dir=str(tmp_path / "out"), progress="False")
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-2000:]
    assert "broken.nii.gz: not a readable NIfTI image" in log
    image, affine = load_image(real_ct)
    mask = nib.load(tmp_path / "out" / "case.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, affine)
