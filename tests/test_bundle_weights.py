"""The weights a bundle ships, where MONAI tools look for them, and what training does to them.

A fresh clone's ``models/model.pt`` (with ``model.json``, its network record, and
``fingerprint.json``) is a link into ``models/demo/``, the shipped demo weights, so that MONAI's
tools, which look at ``models/model.pt`` and build ``network_def`` from ``inference.json`` alone,
find them and build their (reduced) network; training writes the trained-weights file in its
place (atomically: the link is replaced, the demo never written through).

- the links, and what :func:`stmt_monai.inference.bundles.bundle_config` makes of them;
- ``inference.json`` alone builds the network of the weights at ``model_path``
  (:func:`stmt_monai.bundle.recorded`); ``train.json`` too when it continues them (MONAI Label's
  training on its datastore), the config's own when it trains from a prepared dataset;
- ``python -m monai.bundle run --config_file bundles/<b>/configs/inference.json``, as written,
  segments the shipped CT with every bundle (a copy of ``bundles/``, so nothing is written here);
- a README training run into a bundle folder that holds the links leaves ``models/demo/`` as
  shipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import BUNDLE_NAMES, BUNDLES, ENV, TINY, oracle_pseudo_labels, run_readme
from monai.bundle import ConfigParser

from stmt_monai.bundle import config_files, read_record
from stmt_monai.inference.bundles import STAGE_BUNDLES, bundle_config, is_shipped_demo, weights_path

#: the files of a fresh clone's models/ that are links into models/demo/
LINKS = ("model.pt", "model.json", "fingerprint.json")


def parsed(root, workflow: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files(root, workflow)])
    parser["bundle_root"] = str(root)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_bundles(dest):
    """A copy of ``bundles/`` that keeps the links (and no outputs)."""
    return shutil.copytree(BUNDLES, dest, symlinks=True, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__"))


@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_fresh_clone_links_model_pt_to_the_shipped_demo(name):
    models = BUNDLES / name / "models"
    for file in LINKS:
        link = models / file
        assert link.is_symlink() and link.readlink().as_posix() == f"demo/{file}", link
        assert link.resolve() == (models / "demo" / file).resolve() and link.is_file()
    assert is_shipped_demo(models / "model.pt")
    assert read_record(models / "model.pt") == read_record(models / "demo" / "model.pt") != {}
    parser, kind = bundle_config(BUNDLES / name, "auto")
    assert kind == "demo" and weights_path(parser).resolve() == (models / "demo" / "model.pt").resolve()
    with pytest.raises(FileNotFoundError, match="shipped demo"):
        bundle_config(BUNDLES / name, "trained")


@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_configs_build_the_network_of_the_weights_they_load(name, tmp_path):
    """inference.json alone: the record's network (the demo's on a fresh clone); train.json: the
    same when no prepared dataset is there (MONAI Label's datastore training continues the served
    weights), the paper's when it trains a new model from a prepared dataset."""
    demo = read_record(BUNDLES / name / "models" / "demo" / "model.pt")
    keys = ("spatial_size", "base_channels", "num_downsamplings", "max_channels")
    record = {k: demo[k] for k in keys}
    infer = parsed(BUNDLES / name, "inference")
    assert {k: infer.get_parsed_content(k) for k in keys} == record
    continued = parsed(BUNDLES / name, "train", dataset_fingerprint=str(tmp_path / "none.json"))
    assert continued.get_parsed_content("new_model") is False
    assert {k: continued.get_parsed_content(k) for k in keys} == record
    (tmp_path / "fingerprint.json").write_text("{}")
    new = parsed(BUNDLES / name, "train", dataset_fingerprint=str(tmp_path / "fingerprint.json"))
    assert new.get_parsed_content("new_model") is True
    paper = {k: new.get_parsed_content(k) for k in keys}
    assert paper["base_channels"] == 16 and paper["num_downsamplings"] == 5 and paper["max_channels"] == 320
    assert paper["spatial_size"] == ([128] * 3 if name == "coarse_abdomen" else [192] * 3)
    # evaluation (over train.json) scores the weights at model_path: their network
    evaluate = parsed(BUNDLES / name, "evaluate", dataset_fingerprint=str(tmp_path / "fingerprint.json"))
    assert {k: evaluate.get_parsed_content(k) for k in keys} == record


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_monai_bundle_run_inference_json_as_it_is(name, tmp_path, real_ct):
    """The model zoo's command, nothing added: ``python -m monai.bundle run --config_file
    bundles/<b>/configs/inference.json`` from the folder above ``bundles/`` segments the shipped CT
    with the shipped weights and writes ``bundles/<b>/eval/abdomen_ct_3mm.nii.gz`` on its grid."""
    copy_bundles(tmp_path / "bundles")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"bundles/{name}/configs/inference.json"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    written = nib.load(tmp_path / "bundles" / name / "eval" / "abdomen_ct_3mm.nii.gz")
    ct = nib.load(real_ct)
    assert written.shape == ct.shape
    np.testing.assert_allclose(written.affine, ct.affine, atol=1e-4)
    labels = np.asarray(written.dataobj)
    if name in ("organ_selftrain", "cascade"):
        assert 1 in labels  # the liver, with the demo weights
    if name == "coarse_abdomen":
        roi = json.loads((tmp_path / "bundles" / name / "eval" / "abdomen_ct_3mm_roi.json").read_text())
        assert roi["case"] == "abdomen_ct_3mm"


@pytest.mark.slow
def test_training_replaces_the_links_and_leaves_the_shipped_demo(tiny_cohort, tmp_path):
    """The README's training command into a bundle folder as a fresh clone has it: the run writes
    models/model.pt, model.json and fingerprint.json in place of the links, of the network the
    command asks for (a new model from a prepared dataset), and models/demo/ stays as shipped."""
    bundle = copy_bundles(tmp_path / "bundles") / "coarse_abdomen"
    demo = {p.name: sha256(p) for p in (bundle / "models" / "demo").iterdir()}
    pseudo = oracle_pseudo_labels(tiny_cohort.root, tiny_cohort.prepared, tmp_path / "pseudo", max_cpl=1, max_pl=1)
    run_readme(
        "coarse_abdomen", "train", bundle_root=str(bundle), prepared_dir=str(tiny_cohort.prepared),
        pseudo_datalist=str(pseudo), max_epochs="1", val_interval="1", **TINY,
    )
    models = bundle / "models"
    assert {p.name: sha256(p) for p in (models / "demo").iterdir()} == demo
    for file in LINKS:
        assert (models / file).is_file() and not (models / file).is_symlink()
    assert read_record(models / "model.pt")["spatial_size"] == [32, 32, 32]
    assert json.loads((models / "fingerprint.json").read_text()) == json.loads((tiny_cohort.prepared / "fingerprint.json").read_text())
    parser, kind = bundle_config(bundle, "auto")
    assert kind == "trained" and parser.get_parsed_content("spatial_size") == [32, 32, 32]
