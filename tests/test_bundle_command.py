"""stmt_monai.bundle: the one ``monai.bundle run`` command builder, and reading a run's epoch times."""

import ast
import sys
from pathlib import Path

from bundle_helpers import BUNDLES

from stmt_monai.bundle import bundle_command, config_files, epoch_seconds


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_command_layers_the_workflows_configs_and_writes_overrides_back_as_python_values(tmp_path):
    bundle = BUNDLES / "coarse_abdomen"
    args = bundle_command(bundle, "evaluate", {"max_epochs": 3, "spatial_size": [32, 32, 32], "amp": False, "bundle_root": tmp_path})
    assert args[:5] == [sys.executable, "-m", "monai.bundle", "run", "--bundle_root"]
    # a bundle_root override is where the run writes; the configs still come from the bundle
    assert args.count("--bundle_root") == 1 and _flag(args, "--bundle_root") == str(tmp_path.resolve())
    assert ast.literal_eval(_flag(args, "--config_file")) == [str(f) for f in config_files(bundle, "evaluate")]
    assert _flag(args, "--meta_file") == str(bundle.resolve() / "configs" / "metadata.json")
    assert ast.literal_eval(_flag(args, "--spatial_size")) == [32, 32, 32]
    assert (_flag(args, "--max_epochs"), _flag(args, "--amp")) == ("3", "False")
    demo = bundle_command(bundle, "train", demo=True)
    assert ast.literal_eval(_flag(demo, "--config_file"))[-1] == str(bundle.resolve() / "configs" / "demo.json")
    multi = bundle_command(bundle, "train", nproc=2)
    assert multi[:4] == [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m"]
    assert ast.literal_eval(_flag(multi, "--config_file"))[-1].endswith("multi_gpu_train.json")


def test_epoch_seconds_reads_ignite_log_lines():
    log = "\n".join(
        [
            "2026-01-01 10:00:00,000 - ignite.engine.engine.SelfTrainingTrainer - INFO - Epoch[1] Complete. Time taken: 00:00:01.500",
            "2026-01-01 10:00:01,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[1] Complete. Time taken: 00:00:00.250",
            "2026-01-01 10:00:02,000 - ignite.engine.engine.SelfTrainingTrainer - INFO - Epoch[2] Complete. Time taken: 01:02:03.000",
            "2026-01-01 10:00:03,000 - ignite.engine.engine.SelfTrainingTrainer - INFO - Engine run finished. Time taken: 00:00:09.000",
        ]
    )
    assert epoch_seconds(log) == [1.5, 3723.0]
    assert epoch_seconds(log, "SelfTrainingTrainer") == [1.5, 3723.0]
    assert epoch_seconds(log, "Evaluator") == [0.25]
    assert epoch_seconds(log, "MeanTeacherTrainer") == []
