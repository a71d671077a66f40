"""Multi-GPU training configs (``multi_gpu_*.json``) run by real torchrun with 2 processes on the
CPU (gloo), at tiny size, as the bundles' docs/README.md write them.

Each rank gets its own ``ckpt_dir`` and ``log_dir`` (a test-only override), so that what each
rank wrote can be told apart, and a test-only config layered last saves each rank's final
weights (student, and the mean teacher's EMA teacher) under a rank-suffixed name: the ranks must
end with identical weights, and only rank 0 may write checkpoints, ``model.pt`` and TensorBoard.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest
import torch
from bundle_helpers import TINY, oracle_pseudo_labels, readme_commands, run_readme

from stmt_monai.data.sampling import StreamBatchSampler
from stmt_monai.training.losses import CPL, LABELLED, PL

pytestmark = pytest.mark.slow

#: per-rank output folders (test-only: in a real run every rank shares one folder)
PER_RANK = {
    "ckpt_dir": "$@bundle_root + '/models_rank' + str(stmt_monai.training.distributed.rank())",
    "log_dir": "$@bundle_root + '/logs_rank' + str(stmt_monai.training.distributed.rank())",
}


def dump_config(path: Path, modules: dict[str, str]) -> Path:
    """A config layered last: ``finalize`` saves ``{name: state_dict}`` of each rank to
    ``<bundle_root>/final_rank<r>.pt``, then leaves the process group as the bundle's does."""
    state = "{" + ", ".join(f"'{name}': stmt_monai.training.handlers._state_dict({ref})" for name, ref in modules.items()) + "}"
    path.write_text(
        json.dumps(
            {
                "finalize": [
                    f"$torch.save({state}, @bundle_root + '/final_rank' + str(stmt_monai.training.distributed.rank()) + '.pt')",
                    "$stmt_monai.training.distributed.destroy_distributed()",
                ]
            }
        )
    )
    return path


def run_two_ranks(bundle: str, bundle_root: Path, modules: dict[str, str], **overrides: str) -> tuple[str, float]:
    """The README's torchrun command with 2 processes, per-rank folders and the weights dump."""
    args = readme_commands(bundle)["torchrun multi_gpu_train"]
    configs = ast.literal_eval(args[args.index("--config_file") + 1])
    bundle_root.mkdir(parents=True, exist_ok=True)
    configs.append(str(dump_config(bundle_root / "dump.json", modules)))
    start = time.perf_counter()
    log = run_readme(
        bundle, "torchrun multi_gpu_train", timeout=400, nproc_per_node="2", config_file=str(configs),
        bundle_root=str(bundle_root), **PER_RANK, **overrides,
    )
    return log, time.perf_counter() - start


def check_ranks(bundle_root: Path, names: tuple[str, ...]) -> None:
    """Identical final weights on both ranks; checkpoints and TensorBoard from rank 0 only."""
    finals = [torch.load(bundle_root / f"final_rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    for name in names:
        assert finals[0][name].keys() == finals[1][name].keys()
        for key, value in finals[0][name].items():
            assert torch.equal(value, finals[1][name][key]), f"{name}.{key} differs between ranks"
    written = {r: sorted(p.name for p in (bundle_root / f"models_rank{r}").iterdir()) for r in (0, 1)}
    assert {"model.pt", "checkpoint_last.pt", "fingerprint.json"} <= set(written[0])
    assert written[1] == ["fingerprint.json"]  # read by the rank's data transforms; no checkpoint
    assert list((bundle_root / "logs_rank0").glob("events.out.tfevents.*"))
    assert not (bundle_root / "logs_rank1").exists()
    # the saved network is the rank-0 network, unwrapped from DistributedDataParallel
    last = torch.load(bundle_root / "models_rank0" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    for key, value in last["network"].items():
        assert torch.equal(value, finals[0][names[0]][key])
    assert last["trainer"]["iteration"] == last["trainer"]["epoch_length"] >= 1


def test_stream_batches_split_across_ranks():
    """Each rank a disjoint share of every stream, the same stream mix and number of batches."""
    data = [{"stream": s} for s, n in ((LABELLED, 3), (CPL, 8), (PL, 13)) for _ in range(n)]
    ranks = [StreamBatchSampler(data, batch_size=3, seed=2, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    batches = [list(sampler) for sampler in ranks]
    assert len(batches[0]) == len(batches[1]) == 4  # ceil(24 / (3 * 2))
    for b0, b1 in zip(*batches):
        assert [data[i]["stream"] for i in b0] == [data[i]["stream"] for i in b1]
    seen = [[i for batch in rank for i in batch] for rank in batches]
    for stream, n in ((CPL, 8), (PL, 13)):  # streams at least as long as the epoch's draws
        share = [{i for i in rank if data[i]["stream"] == stream} for rank in seen]
        assert not share[0] & share[1]
    # the single-process sampler is unchanged: rank 0 of 1
    assert list(StreamBatchSampler(data, batch_size=3, seed=2)) == list(StreamBatchSampler(data, batch_size=3, seed=2, num_replicas=1, rank=0))


def test_organ_student_two_ranks_end_identical(tiny_cohort, tmp_path):
    pseudo = oracle_pseudo_labels(tiny_cohort.root, tiny_cohort.prepared, tmp_path / "pseudo")
    log, seconds = run_two_ranks(
        "organ_selftrain", tmp_path / "bundle", {"network": "@network"}, prepared_dir=str(tiny_cohort.prepared),
        pseudo_datalist=str(pseudo), max_epochs="1", val_interval="1", **TINY,
    )
    print(f"organ student, 2 ranks, 1 epoch: {seconds:.1f} s")
    assert "val_mean_dice" in log and "Epoch: 1/1" in log
    check_ranks(tmp_path / "bundle", ("network",))


def test_tumor_mean_teacher_two_ranks_end_identical(tiny_cohort, tmp_path):
    log, seconds = run_two_ranks(
        "tumor_meanteacher", tmp_path / "bundle", {"network": "@network", "teacher": "@teacher"},
        prepared_dir=str(tiny_cohort.prepared), max_epochs="1", val_interval="1", **TINY,
    )
    print(f"tumor mean teacher, 2 ranks, 1 epoch: {seconds:.1f} s")
    assert "val_dice_teacher" in log
    check_ranks(tmp_path / "bundle", ("network", "teacher"))
    final = torch.load(tmp_path / "bundle" / "final_rank0.pt", map_location="cpu", weights_only=True)
    # the EMA teacher moved with the student but is not a copy of it
    assert any(not torch.equal(final["network"][k], final["teacher"][k]) for k in final["network"])
