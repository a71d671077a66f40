"""Seconds per training iteration of each StMt training workflow at the paper's sizes.

    python benchmarks/train_step_speed.py --device cuda            # a GPU (AMP, as the bundles do there)
    python benchmarks/train_step_speed.py --device cpu --steps 2 --workflows organ_student

Each workflow is the bundles' own trainer, network, loss and optimiser (not a re-implementation)
on in-memory random batches of the workflow's input size, so the figure is the network and
engine cost per iteration without data loading (the bundles' loaders run in parallel worker
processes):

- ``abdomen``: stage 1, ``SelfTrainingTrainer``, Res-UNet 16..320, 128^3, batch 2, 2 classes,
  the three streams' weighted Dice + CE;
- ``organ_student``: stage 2 organs, same trainer, 192^3, batch 3 (one case per stream), 14 classes;
- ``organ_teacher``: the organ teacher (SwinUNETR-v2, 96^3 patches, batch 2, 14 classes),
  plain ``SupervisedTrainer``; ``--teacher_kind res_unet_large`` for the convolutional one (128^3);
- ``tumor_meanteacher``: ``MeanTeacherTrainer`` (teacher forward, real-time correction,
  ``L_t = L_tl + L_cpl``, EMA update), 192^3, batch 2, 2 classes.

Prints one JSON line per workflow (median seconds per iteration after ``--warmup`` untimed
iterations, peak device memory on CUDA) and a markdown table. Time per epoch = iterations per
epoch x this (the bundles' epoch is one pass: ``ceil(cases / batch size)`` iterations).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import fire
import torch
from ignite.engine import Events

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not
from stmt_monai.networks import count_parameters, res_unet, teacher_network, teacher_roi_size  # noqa: E402
from stmt_monai.training.engines import MeanTeacherTrainer, SelfTrainingTrainer
from stmt_monai.training.losses import ORGAN_STREAM_WEIGHTS, STREAMS, TUMOR_STREAM_WEIGHTS, WeightedStreamsLoss, dice_ce_loss
from stmt_monai.training.mean_teacher import ema_teacher

#: (input size, batch size, classes) of each workflow: the bundles' defaults (paper Table 2)
WORKFLOWS = {
    "abdomen": ((128, 128, 128), 2, 2),
    "organ_student": ((192, 192, 192), 3, 14),
    "organ_teacher": (None, 2, 14),
    "tumor_meanteacher": ((192, 192, 192), 2, 2),
}


def _batches(size, batch_size, classes, n, streams: bool):
    """``n`` random batches (image ``N(0, 1)``, labels uniform over the classes)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        batch = {
            "image": torch.randn(batch_size, 1, *size, generator=generator),
            "label": torch.randint(0, classes, (batch_size, 1, *size), generator=generator).float(),
        }
        if streams:
            batch["stream"] = [STREAMS[i % len(STREAMS)] for i in range(batch_size)]
        out.append(batch)
    return out


def _optimizer(network):
    """The bundles' optimiser: SGD, Nesterov momentum 0.99, lr 0.01, weight decay 3e-5."""
    return torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)


def measure(workflow: str, device: torch.device, steps: int, warmup: int, teacher_kind: str) -> dict:
    size, batch_size, classes = WORKFLOWS[workflow]
    amp = device.type == "cuda"
    kwargs = {}
    if workflow == "organ_teacher":
        size = tuple(teacher_roi_size(teacher_kind))
        network = teacher_network(teacher_kind, in_channels=1, out_channels=classes).to(device)
        trainer_cls, loss = None, dice_ce_loss()
    else:
        network = res_unet(in_channels=1, out_channels=classes, input_size=size).to(device)
        if workflow == "tumor_meanteacher":
            trainer_cls, loss = MeanTeacherTrainer, WeightedStreamsLoss(TUMOR_STREAM_WEIGHTS)
            ema = ema_teacher(network)
            kwargs["teacher"] = ema.ema_model
        else:
            trainer_cls, loss = SelfTrainingTrainer, WeightedStreamsLoss(ORGAN_STREAM_WEIGHTS)
    data = _batches(size, batch_size, classes, warmup + steps, streams=trainer_cls is SelfTrainingTrainer)
    if trainer_cls is None:
        from monai.engines import SupervisedTrainer

        trainer_cls = SupervisedTrainer
    trainer = trainer_cls(
        device=device,
        max_epochs=1,
        train_data_loader=data,
        network=network,
        optimizer=_optimizer(network),
        loss_function=loss,
        amp=amp,
        **kwargs,
    )
    if workflow == "tumor_meanteacher":
        ema.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
    times: list[float] = []
    clock = {}

    def started(engine):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        clock["t"] = time.perf_counter()

    def completed(engine):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if engine.state.iteration > warmup:
            times.append(time.perf_counter() - clock["t"])

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)  # after the EMA update
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    row = {
        "workflow": workflow,
        "network": teacher_kind if workflow == "organ_teacher" else "res_unet",
        "parameters": count_parameters(network),
        "input": "x".join(map(str, size)),
        "batch_size": batch_size,
        "amp": amp,
        "s_per_iteration": round(statistics.median(times), 4),
        "iterations_timed": len(times),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del trainer, network
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
    workflows: str | tuple = tuple(WORKFLOWS),
    steps: int = 10,
    warmup: int = 3,
    teacher_kind: str = "swin_unetr",
    threads: int | None = None,
    output: str | None = None,
) -> list[dict]:
    """Time each workflow's training iteration; see the module docstring.

    Args:
        device: ``cuda`` or ``cpu``.
        workflows: comma-separated subset of ``abdomen, organ_student, organ_teacher, tumor_meanteacher``.
        steps: timed iterations per workflow (the median is reported).
        warmup: untimed iterations first (cuDNN autotuning, allocator).
        teacher_kind: organ teacher network, ``swin_unetr`` or ``res_unet_large``.
        threads: CPU threads (``torch.set_num_threads``).
        output: also write the rows as JSON here.
    """
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    names = workflows.split(",") if isinstance(workflows, str) else list(workflows)
    unknown = sorted(set(names) - set(WORKFLOWS))
    if unknown:
        sys.exit(f"unknown workflows {unknown}; choose from {list(WORKFLOWS)}")
    rows = []
    for name in names:
        row = measure(name, device, steps, warmup, teacher_kind)
        rows.append(row)
        print(json.dumps(row), flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    print(f"\n| workflow | network | input | batch | s / iteration | peak GPU memory (GiB) | device |\n| --- | --- | --- | --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['workflow']} | {r['network']} | {r['input']} | {r['batch_size']} | {r['s_per_iteration']:.3f} | {r.get('peak_memory_gib', '-')} | {where}{', AMP' if r['amp'] else ''} |")
    if output:
        Path(output).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    fire.Fire(main)
