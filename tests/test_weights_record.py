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
