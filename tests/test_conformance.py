"""Every bundle against the MONAI bundle conventions, offline.

For each bundle in ``bundles/``:

- ``verify_metadata`` against the schema copy in the package (the README's command, which names
  ``--filepath stmt_monai/resources/meta_schema_20240725.json``, so nothing is downloaded);
- ``verify_net_in_out`` for every network the README names, at a reduced size (same channels
  and dtype: the networks are fully convolutional);
- every ``channel_def`` of the metadata against :mod:`stmt_monai.labels`;
- every command of its docs/README.md runs as written (tiny sizes and temporary folders given as
  ``--key value`` overrides). Commands that another test already runs are listed in
  :data:`RUN_ELSEWHERE` and not run twice; the rest run here. ``python -m monai.bundle verify_*``,
  ``ckpt_export`` and ``python scripts/export.py`` run in this process (``runpy`` with the same
  argv, from the repository root: no interpreter start-up); ``torchrun`` and training runs as
  subprocesses.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from bundle_helpers import (
    BUNDLE_NAMES,
    BUNDLES,
    REPO,
    SCHEMA,
    TINY,
    TINY_TEACHER,
    oracle_pseudo_labels,
    readme_commands,
    run_readme,
    with_overrides,
)
from cascade_helpers import TINY as TINY_NETWORKS
from cascade_helpers import random_bundles

from stmt_monai.inference.bundles import STAGE_BUNDLES, load_weights
from stmt_monai.labels import ALL_CHANNELS, label_name, stage_channels, stage_output_map

#: bundle -> the stage its network predicts (the cascade: the final FLARE label map)
STAGE_OF = {name: stage for stage, name in STAGE_BUNDLES.items()}

#: README commands run as written by another test (bundle, kind) -> where
RUN_ELSEWHERE = {
    ("coarse_abdomen", "train"): "test_bundle_coarse_abdomen.py::trained",
    ("coarse_abdomen", "evaluate"): "test_bundle_coarse_abdomen.py::test_evaluate_scores_model_at_input_resolution",
    ("coarse_abdomen", "inference"): "test_bundle_coarse_abdomen.py::test_inference_writes_mask_and_roi_at_input_geometry",
    ("organ_selftrain", "train_teacher"): "test_bundle_organ_selftrain.py::pipeline",
    ("organ_selftrain", "pseudo_label"): "test_bundle_organ_selftrain.py::pipeline",
    ("organ_selftrain", "train"): "test_bundle_organ_selftrain.py::pipeline",
    ("organ_selftrain", "evaluate"): "test_bundle_organ_selftrain.py::test_evaluate_scores_the_student_at_input_resolution",
    ("organ_selftrain", "inference"): "test_bundle_organ_selftrain.py::test_inference_roi_in_organ_map_out_at_input_geometry",
    ("organ_selftrain", "torchrun multi_gpu_train"): "test_multi_gpu.py::test_organ_student_two_ranks_end_identical",
    ("tumor_meanteacher", "train"): "test_bundle_tumor_meanteacher.py::trained",
    ("tumor_meanteacher", "evaluate"): "test_bundle_tumor_meanteacher.py::test_evaluate_scores_both_networks",
    ("tumor_meanteacher", "inference"): "test_bundle_tumor_meanteacher.py::test_inference_writes_flare_tumor_map_on_input_grid",
    ("tumor_meanteacher", "torchrun multi_gpu_train"): "test_multi_gpu.py::test_tumor_mean_teacher_two_ranks_end_identical",
    ("cascade", "inference"): "test_bundle_cascade.py::test_readme_command_segments_a_folder_and_fails_on_a_bad_case",
}
#: README commands this file runs (bundle, kind)
RUN_HERE = {
    *((name, "verify_metadata") for name in BUNDLE_NAMES),
    ("coarse_abdomen", "verify_net_in_out network_def"),
    ("organ_selftrain", "verify_net_in_out network_def"),
    ("organ_selftrain", "verify_net_in_out teacher_def"),
    ("tumor_meanteacher", "verify_net_in_out network_def"),
    ("coarse_abdomen", "torchrun multi_gpu_train"),
    ("organ_selftrain", "torchrun multi_gpu_train_teacher"),
    ("tumor_meanteacher", "train 2"),  # FST
    *((name, "ckpt_export network_def") for name in STAGE_BUNDLES.values()),
    *((name, "scripts/export.py") for name in STAGE_BUNDLES.values()),
}
#: reduced sizes of verify_net_in_out (same channels and dtype as the declared sizes)
NET_IN_OUT_OVERRIDES = {
    "network_def": {"--_meta_#network_data_format#inputs#image#spatial_shape": "[64,64,64]", "--base_channels": "4", "--n": "1"},
    "teacher_def": {"--_meta_#network_data_format#inputs#image#spatial_shape": "[64,64,64]", "--teacher_feature_size": "12"},
}


def run_in_process(args: list[str], monkeypatch) -> None:
    """``python -m <module> ...`` or ``python scripts/<name>.py ...`` in this process, from the
    repository root, with exactly that argv (both are python-fire command lines)."""
    monkeypatch.chdir(REPO)
    if args[1] == "-m":
        monkeypatch.setattr(sys, "argv", [args[2], *args[3:]])
        runpy.run_module(args[2], run_name="__main__", alter_sys=True)
    else:
        monkeypatch.setattr(sys, "argv", args[1:])
        runpy.run_path(args[1], run_name="__main__")


def replace_args(args: list[str], flags: dict[str, str]) -> list[str]:
    """``args`` with each ``--flag value`` replaced (or appended)."""
    args = list(args)
    for flag, value in flags.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


# ----------------------------------------------------------------------------- bookkeeping
def test_every_readme_command_is_run_by_some_test():
    commands = {(name, kind) for name in BUNDLE_NAMES for kind in readme_commands(name)}
    assert commands == set(RUN_ELSEWHERE) | RUN_HERE
    assert not set(RUN_ELSEWHERE) & RUN_HERE


# ----------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_verify_metadata_offline(name, monkeypatch):
    args = readme_commands(name)["verify_metadata"]
    assert args[args.index("--filepath") + 1] == str(SCHEMA.relative_to(REPO))  # the local copy: no download
    run_in_process(args, monkeypatch)
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_channel_defs_come_from_labels(name):
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    stage = STAGE_OF.get(name)
    predicted = stage_channels(stage) if stage else ALL_CHANNELS
    formats = [value for key, value in meta.items() if key.endswith("_data_format")]
    assert formats
    for fmt in formats:
        image = fmt["inputs"]["image"]
        assert image["channel_def"] == {"0": "image"} and image["num_channels"] == 1
        pred = fmt["outputs"]["pred"]
        assert pred["channel_def"] == {str(k): v for k, v in predicted.items()}
        assert pred["num_channels"] == len(predicted)
        if "post_processed_outputs" in fmt:  # a FLARE label map: the stage's channels as FLARE labels
            labels = stage_output_map(stage)[1]
            assert fmt["post_processed_outputs"]["pred"]["channel_def"] == {str(k): label_name(k) for k in labels}


@pytest.mark.parametrize("name, kind", sorted(k for k in RUN_HERE if k[1].startswith("verify_net_in_out")))
def test_verify_net_in_out(name, kind, monkeypatch):
    torch.set_num_threads(1)
    args = readme_commands(name)[kind]
    run_in_process(replace_args(args, NET_IN_OUT_OVERRIDES[kind.split()[1]]), monkeypatch)


# ----------------------------------------------------------------------------- export commands
@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    """The three stage bundles at tiny size (``configs/demo.json``) with random weights."""
    return random_bundles(tmp_path_factory.mktemp("conformance") / "bundles")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_readme_ckpt_export(name, tiny_bundles, tmp_path, monkeypatch):
    """The README's ckpt_export command on a tiny model.pt (tumor: ``{"teacher": ...}``)."""
    torch.set_num_threads(1)
    ckpt = tiny_bundles / name / "models" / "demo" / "model.pt"
    args = with_overrides(
        readme_commands(name)["ckpt_export network_def"], bundle_root=str(tmp_path), filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(ckpt), **{k: str(v) for k, v in TINY_NETWORKS.items()},  # the tiny weights' network
    )
    run_in_process(args, monkeypatch)
    exported = torch.jit.load(str(tmp_path / "model.ts")).state_dict()
    weights = load_weights(ckpt, "teacher" if name == "tumor_meanteacher" else None)
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_readme_export_script(name, tiny_bundles, tmp_path, monkeypatch):
    """``python scripts/export.py bundles/<name>`` on a copy of the tiny bundle (demo weights)."""
    torch.set_num_threads(1)
    bundle = shutil.copytree(tiny_bundles / name, tmp_path / name)
    args = [str(bundle) if a == f"bundles/{name}" else a for a in readme_commands(name)["scripts/export.py"]]
    run_in_process(with_overrides(args, weights="demo"), monkeypatch)
    assert (bundle / "models" / "demo" / "model.ts").is_file() and (bundle / "models" / "demo" / "model.onnx").is_file()
    # each export computes the bundle's own network: its logits on a random input agree
    from stmt_monai.inference.bundles import load_network
    from stmt_monai.inference.export import max_abs_difference

    network, parser, _ = load_network(bundle, "demo")
    x = torch.randn(1, 1, *parser.get_parsed_content("spatial_size"), generator=torch.Generator().manual_seed(0))
    exports = [bundle / "models" / "demo" / name for name in ("model.ts", "model.onnx")]
    assert all(d < 1e-3 for d in max_abs_difference(network, exports, x).values())


# ----------------------------------------------------------------------------- training commands
@pytest.mark.slow
def test_readme_torchrun_coarse_abdomen(tiny_cohort, tmp_path):
    pseudo = oracle_pseudo_labels(tiny_cohort.root, tiny_cohort.prepared, tmp_path / "pseudo", max_cpl=2, max_pl=1)
    log = run_readme(
        "coarse_abdomen", "torchrun multi_gpu_train", bundle_root=str(tmp_path / "bundle"), prepared_dir=str(tiny_cohort.prepared),
        pseudo_datalist=str(pseudo), max_epochs="1", val_interval="1", **TINY,
    )
    assert "val_mean_dice" in log
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_readme_torchrun_organ_teacher(tiny_cohort, tmp_path):
    log = run_readme(
        "organ_selftrain", "torchrun multi_gpu_train_teacher", bundle_root=str(tmp_path / "bundle"),
        prepared_dir=str(tiny_cohort.prepared), teacher_max_epochs="1", teacher_val_interval="1", **TINY_TEACHER,
    )
    assert "teacher_val_mean_dice" in log
    assert (tmp_path / "bundle" / "models" / "teacher.pt").is_file()


@pytest.mark.slow
def test_readme_fst_command(tiny_cohort, tmp_path):
    """The tumor bundle's FST command (lambda = 0, the student kept as inference network)."""
    ckpt_dir = tmp_path / "models_fst"
    log = run_readme(
        "tumor_meanteacher", "train 2", prepared_dir=str(tiny_cohort.prepared), ckpt_dir=str(ckpt_dir),
        log_dir=str(tmp_path / "logs"), max_epochs="1", val_interval="1", **TINY,
    )
    assert "val_dice_student" in log
    pair = torch.load(ckpt_dir / "mean_teacher.pt", map_location="cpu", weights_only=True)
    served = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)  # bare: the student
    assert set(pair) == {"student", "teacher"} and all(torch.equal(served[k], pair["student"][k]) for k in served)


# ----------------------------------------------------------------------------- the model zoo's checks
# What Project-MONAI/model-zoo's ci/verify_bundle.py checks in its full mode, offline, on each
# bundle as shipped: the necessary and preferred files, the metadata against MONAI's schema with
# its version in the changelog (test_verify_metadata_offline above), the workflows' properties
# (monai.bundle.create_workflow(...).check_properties()), and the network checks with
# inference.json alone: verify_net_in_out at the metadata's shape and ckpt_export of models/model.pt.
# The cascade has no network of its own (it chains the three stage bundles' networks): the files,
# the metadata and its inference workflow, not the network checks.
ZOO_FILES = ("configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md")


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_zoo_necessary_and_preferred_files(name):
    bundle = BUNDLES / name
    missing = [f for f in ZOO_FILES if not (bundle / f).is_file()]
    if name in STAGE_BUNDLES.values():
        missing += [f for f in ("models/model.pt", "configs/train.json", "models/large_files.yml") if not (bundle / f).is_file()]
    assert not missing, f"{name}: {missing}"


@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_zoo_infer_workflow_properties(name, monkeypatch):
    from monai.bundle import create_workflow

    monkeypatch.chdir(REPO)
    bundle = BUNDLES / name
    workflow = create_workflow(
        config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="infer"
    )
    assert not workflow.check_properties()


@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_zoo_train_workflow_properties(name, tiny_cohort, tmp_path, monkeypatch):
    """train.json read alone as a "train" workflow (on the tiny prepared cohort: the properties
    are built, datasets included; its initialize writes into a temporary bundle_root); the organ
    bundle's teacher workflow too."""
    from monai.bundle import create_workflow

    monkeypatch.chdir(REPO)
    bundle = BUNDLES / name
    overrides = {"bundle_root": str(tmp_path), "prepared_dir": str(tiny_cohort.prepared), "pseudo_datalist": [], "num_workers": 0}
    for config in ("train.json", "train_teacher.json"):
        if not (bundle / "configs" / config).is_file():
            continue
        workflow = create_workflow(
            config_file=str(bundle / "configs" / config), meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="train",
            **overrides,
        )
        assert not workflow.check_properties(), config


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGE_BUNDLES.values()))
def test_zoo_network_checks_with_inference_json_alone(name, tmp_path, monkeypatch):
    """verify_net_in_out at the metadata's input shape and ckpt_export of the shipped
    models/model.pt, each given inference.json alone: the network is built for the weights (their
    record), and the TorchScript holds exactly those weights."""
    from monai.bundle import ckpt_export, verify_net_in_out

    torch.set_num_threads(1)
    monkeypatch.chdir(REPO)
    bundle = BUNDLES / name
    config, meta = str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(bundle))
    ckpt_export(
        net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=meta, config_file=config, bundle_root=str(bundle),
    )
    exported = torch.jit.load(str(tmp_path / "model.ts")).state_dict()
    weights = load_weights(bundle / "models" / "model.pt")
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


def test_zoo_cascade_inference_workflow_runs_alone():
    """The cascade's inference.json parses alone (its ids resolve without any other config)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "cascade" / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / "cascade")
    assert parser.get_parsed_content("stage_bundles").keys() == set(STAGE_BUNDLES)
    assert Path(parser.get_parsed_content("input")).is_file()
