"""Seconds per training iteration of each StMt training workflow at the paper's sizes.

    python benchmarks/train_step_speed.py --device cuda            # a GPU (AMP, as the bundles do there)
    python benchmarks/train_step_speed.py --device cpu --steps 2 --workflows organ_student

Each workflow's network, loss and optimiser are the bundle's own, built from its training config
(:func:`stmt_monai.bundle.workflow_parser`: ``network`` / ``loss`` / ``optimizer``, the tumor
bundle's ``ema`` and ``teacher``, the organ bundle's ``teacher`` / ``teacher_loss`` /
``teacher_optimizer``), and so are the input and batch sizes; the trainer is the bundle's engine
class on in-memory random batches, so the figure is the network and engine cost per iteration
without data loading (the bundles' loaders run in parallel worker processes):

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
from monai.engines import SupervisedTrainer

from stmt_monai.bundle import workflow_parser
from stmt_monai.inference.bundles import default_bundles_dir
from stmt_monai.networks import count_parameters
from stmt_monai.training.engines import MeanTeacherTrainer, SelfTrainingTrainer
from stmt_monai.training.losses import STREAMS

#: bundle, workflow config, trainer and the config ids of network / loss / optimiser / sizes
WORKFLOWS = {
    "abdomen": ("coarse_abdomen", "train", SelfTrainingTrainer, "network", "loss", "optimizer", "spatial_size", "batch_size"),
    "organ_student": ("organ_selftrain", "train", SelfTrainingTrainer, "network", "loss", "optimizer", "spatial_size", "batch_size"),
    "organ_teacher": ("organ_selftrain", "train_teacher", SupervisedTrainer, "teacher", "teacher_loss", "teacher_optimizer", "teacher_roi_size", "teacher_batch_size"),
    "tumor_meanteacher": ("tumor_meanteacher", "train", MeanTeacherTrainer, "network", "loss", "optimizer", "spatial_size", "batch_size"),
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


def measure(workflow: str, device: torch.device, steps: int, warmup: int, teacher_kind: str, overrides: dict | None = None) -> dict:
    """Median seconds per training iteration of one workflow (and its peak GPU memory on CUDA).

    ``overrides`` go to the bundle's config (e.g. ``{"spatial_size": [64, 64, 64]}`` for a quick run).
    """
    bundle, config, trainer_cls, net_id, loss_id, optimizer_id, size_id, batch_id = WORKFLOWS[workflow]
    amp = device.type == "cuda"
    parser = workflow_parser(default_bundles_dir() / bundle, config, {"device": device, "amp": amp, "teacher_kind": teacher_kind, **(overrides or {})})
    network = parser.get_parsed_content(net_id)
    size, batch_size = tuple(parser.get_parsed_content(size_id)), int(parser.get_parsed_content(batch_id))
    classes = int(parser.get_parsed_content("out_channels"))
    kwargs = {"teacher": parser.get_parsed_content("teacher")} if trainer_cls is MeanTeacherTrainer else {}
    data = _batches(size, batch_size, classes, warmup + steps, streams=trainer_cls is SelfTrainingTrainer)
    trainer = trainer_cls(
        device=device,
        max_epochs=1,
        train_data_loader=data,
        network=network,
        optimizer=parser.get_parsed_content(optimizer_id),
        loss_function=parser.get_parsed_content(loss_id),
        amp=amp,
        **kwargs,
    )
    if trainer_cls is MeanTeacherTrainer:
        parser.get_parsed_content("ema").attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
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
