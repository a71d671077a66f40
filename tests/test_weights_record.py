"""Weights carry their network: the record beside model.pt, and loading it back."""

from __future__ import annotations

import json

import torch
from ignite.engine import Engine

from stmt_monai.bundle import bundle_command, read_record, record_path, write_record
from stmt_monai.networks import res_unet
from stmt_monai.training.handlers import BestCheckpoint


def test_record_round_trip_and_path(tmp_path):
    weights = tmp_path / "models" / "model.pt"
    assert record_path(weights) == tmp_path / "models" / "model.json"
    assert read_record(weights) == {}
    write_record(weights, {"spatial_size": (48, 48, 48), "base_channels": torch.tensor(8), "max_channels": 320})
    assert read_record(weights) == {"spatial_size": [48, 48, 48], "base_channels": 8, "max_channels": 320}
    record_path(weights).write_text("[1, 2]")
    try:
        read_record(weights)
    except ValueError as err:
        assert str(err).startswith(str(record_path(weights))) and "\n" not in str(err)
    else:
        raise AssertionError("a record that is not an object must be refused")


def test_best_checkpoint_writes_record_with_each_improvement(tmp_path):
    network = res_unet(1, 2, base_channels=4, num_downsamplings=2, input_size=[16, 16, 16])
    record = {"spatial_size": [16, 16, 16], "base_channels": 4, "num_downsamplings": 2}
    saver = BestCheckpoint(tmp_path / "model.pt", {"model": network}, metric_name="dice", record=record)
    engine = Engine(lambda e, b: None)
    for value in (0.2, 0.1):
        engine.state.metrics = {"dice": value}
        saver(engine)
    assert json.loads((tmp_path / "model.json").read_text()) == record
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == set(network.state_dict())
    assert not list(tmp_path.glob(".*part*"))  # written atomically, no leftovers


def test_bundle_command_passes_the_record_as_args_file(tmp_path):
    from bundle_helpers import BUNDLES

    command = bundle_command(BUNDLES / "coarse_abdomen", "inference", {"input_dir": "in"}, args_file=tmp_path / "model.json")
    at = command.index("--args_file")
    assert command[at + 1] == str(tmp_path / "model.json") and command.index("--input_dir") > at


def tiny_trained_bundle(tmp_path, record: bool):
    """A copy of the coarse_abdomen bundle's configs with tiny weights in models/model.pt, as a
    training with ``--spatial_size [32,32,32] --base_channels 4 --num_downsamplings 3`` leaves them."""
    import shutil

    from bundle_helpers import BUNDLES

    from stmt_monai.inference.bundles import save_weights
    from stmt_monai.preprocessing.fingerprint import Fingerprint

    root = tmp_path / "coarse_abdomen"
    shutil.copytree(BUNDLES / "coarse_abdomen" / "configs", root / "configs")
    network = res_unet(1, 2, base_channels=4, num_downsamplings=3, input_size=[32, 32, 32])
    weights = save_weights(root / "models" / "model.pt", network.state_dict())
    Fingerprint(lower=-100.0, upper=200.0, mean=40.0, std=50.0).save(root / "models" / "fingerprint.json")
    if record:
        write_record(weights, {"spatial_size": [32, 32, 32], "base_channels": 4, "num_downsamplings": 3})
    return root, weights, network


def test_load_network_builds_the_recorded_network(tmp_path):
    from stmt_monai.inference.bundles import bundle_config, load_network

    root, weights, trained = tiny_trained_bundle(tmp_path, record=True)
    network, parser, kind = load_network(root, "trained")
    assert kind == "trained" and parser.get_parsed_content("spatial_size") == [32, 32, 32]
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), trained.state_dict().values()))
    assert bundle_config(root, "auto")[0]["base_channels"] == 4  # what StageModel reads too


def test_weights_without_record_fail_in_one_line_naming_file_and_tensors(tmp_path):
    import pytest

    from stmt_monai.inference.bundles import load_network
    from stmt_monai.networks import WeightsMismatch

    root, weights, _ = tiny_trained_bundle(tmp_path, record=False)
    with pytest.raises(WeightsMismatch) as info:
        load_network(root, "trained")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{weights}: the weights do not fit the network")
    assert "tensors of another shape (first " in message and "missing" in message and f"no record of their network beside them ({root / 'models' / 'model.json'})" in message
    assert "Missing key(s)" not in message  # not PyTorch's dump


def test_bundle_inference_weights_loader_names_the_record(tmp_path):
    """The bundles' inference and evaluation handler (``WeightsLoader``): the config's network
    (paper size) against tiny weights with a record: one line that says what they were trained with."""
    import pytest

    from stmt_monai.networks import WeightsMismatch
    from stmt_monai.training.handlers import WeightsLoader

    root, weights, _ = tiny_trained_bundle(tmp_path, record=True)
    paper = res_unet(1, 2, base_channels=16, num_downsamplings=3, input_size=[32, 32, 32])
    with pytest.raises(WeightsMismatch) as info:
        WeightsLoader(str(weights), {"model": paper})(Engine(lambda e, b: None))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(weights))
    assert "base_channels=4" in message and f"--args_file {root / 'models' / 'model.json'}" in message


def test_shipped_demo_weights_have_their_record():
    """Each stage bundle's demo weights: ``models/demo/model.json`` agrees with ``configs/demo.json``
    (how they were trained) and builds the network the weights fit."""
    from bundle_helpers import BUNDLES

    from stmt_monai.inference.bundles import NETWORK_KEYS, STAGE_BUNDLES, load_network

    for name in STAGE_BUNDLES.values():
        record = read_record(BUNDLES / name / "models" / "demo" / "model.pt")
        demo = json.loads((BUNDLES / name / "configs" / "demo.json").read_text())
        assert set(record) == set(NETWORK_KEYS)
        assert all(record[k] == v for k, v in demo.items() if k in record)
        network, parser, kind = load_network(BUNDLES / name, "demo")
        assert kind == "demo" and list(parser.get_parsed_content("spatial_size")) == record["spatial_size"]


def test_train_configs_record_the_network_keys():
    """Each stage training records exactly :data:`NETWORK_KEYS` (the organ teacher its own keys)."""
    from bundle_helpers import BUNDLES

    from stmt_monai.inference.bundles import NETWORK_KEYS, STAGE_BUNDLES

    for name in STAGE_BUNDLES.values():
        config = json.loads((BUNDLES / name / "configs" / "train.json").read_text())
        assert config["validate"]["best_checkpoint"]["record"] == {k: f"@{k}" for k in NETWORK_KEYS}
    teacher = json.loads((BUNDLES / "organ_selftrain" / "configs" / "train_teacher.json").read_text())
    assert set(teacher["validate"]["best_checkpoint"]["record"]) >= {"teacher_kind", "teacher_roi_size", "teacher_spacing_mm"}


def test_resume_with_another_network_fails_in_one_line(tmp_path):
    """A training resumed with other network keys than the run that saved its state: one line
    naming the checkpoint and the differing tensors, not PyTorch's dump."""
    import pytest

    from stmt_monai.networks import WeightsMismatch
    from stmt_monai.training.handlers import ResumableCheckpoint

    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(tmp_path, {"network": res_unet(1, 2, base_channels=4, num_downsamplings=2, input_size=[16, 16, 16])}).save(engine)
    resumed = ResumableCheckpoint(tmp_path, {"network": res_unet(1, 2, base_channels=8, num_downsamplings=2, input_size=[16, 16, 16])})
    with pytest.raises(WeightsMismatch) as info:
        resumed.load(engine)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'checkpoint_last.pt'}: the training state of an earlier run does not fit")
    assert "network: " in message and "tensors of another shape" in message and "delete it to train afresh" in message
