"""bundles/cascade: its docs/README.md inference command run as written (metadata: tests/test_conformance.py)."""

import subprocess

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import ENV, REPO, readme_commands, with_overrides
from cascade_helpers import random_bundles

from stmt_monai.io import load_image

BUNDLE = REPO / "bundles" / "cascade"


@pytest.mark.slow
def test_readme_command_segments_a_folder_and_fails_on_a_bad_case(tmp_path, real_ct):
    bundles = random_bundles(tmp_path / "bundles")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "case_0000.nii.gz").write_bytes(real_ct.read_bytes())
    (inputs / "broken.nii.gz").write_text("not an image")
    args = with_overrides(readme_commands("cascade")["inference"], bundles_dir=str(bundles), input=str(inputs), output_dir=str(tmp_path / "out"), progress="False")
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-2000:]
    assert "broken.nii.gz: not a readable NIfTI image" in log
    image, affine = load_image(real_ct)
    mask = nib.load(tmp_path / "out" / "case.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, affine)
