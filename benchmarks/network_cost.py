"""Size, FLOPs and CPU forward time of StMt's networks, against the paper's Table 2.

    python benchmarks/network_cost.py --threads 2
    python benchmarks/network_cost.py --threads 2 --repeats 1 --only student   # quicker
    python benchmarks/network_cost.py --timing False                           # FLOPs only, instant

For the student Res-UNet on its whole-volume inputs (128^3 stage 1; 192^3 organs and tumor)
and for each teacher on its training patch: parameters, FLOPs of one forward pass of one
sample (``stmt_monai.networks.forward_flops``: 2 FLOPs per multiply-add, convolutions and
matrix products), and the median CPU forward time under ``torch.inference_mode``.

The paper's Table 2 gives 372.55 / 1886.03 / 1257.35 GFLOPs for the stage-1 / organ / tumor
models at batch sizes 2 / 3 / 2, i.e. 186.3 / 628.7 / 628.7 GFLOPs per sample, and 45.87 M
parameters; it does not say how it counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import fire
import torch

from stmt_monai.networks import count_parameters, forward_flops, res_unet, teacher_network, teacher_roi_size

#: Table 2: total GFLOPs and batch size of the stage-1 / organ / tumor students
PAPER_GFLOPS = {"stage 1 abdomen": (372.55, 2), "organ": (1886.03, 3), "tumor": (1257.35, 2)}
PAPER_PARAMS_M = 45.87


def _cases() -> list[tuple[str, str, Callable[[], torch.nn.Module], tuple[int, ...], str | None]]:
    """(group, name, builder, spatial size, paper row) of every network measured."""
    return [
        ("student", "student Res-UNet, out 2 (stage 1 abdomen)", lambda: res_unet(out_channels=2), (128,) * 3, "stage 1 abdomen"),
        ("student", "student Res-UNet, out 14 (organs)", lambda: res_unet(out_channels=14), (192,) * 3, "organ"),
        ("student", "student Res-UNet, out 2 (tumor)", lambda: res_unet(out_channels=2), (192,) * 3, "tumor"),
        ("teacher", "teacher swin_unetr, out 14", lambda: teacher_network("swin_unetr"), teacher_roi_size("swin_unetr"), None),
        (
            "teacher",
            "teacher res_unet_large, out 14",
            lambda: teacher_network("res_unet_large"),
            teacher_roi_size("res_unet_large"),
            None,
        ),
    ]


def forward_seconds(model: torch.nn.Module, spatial: tuple[int, ...], repeats: int, warmup: int) -> list[float]:
    """Wall times (s) of ``repeats`` batch-1 CPU forward passes, run after ``warmup`` untimed ones."""
    model = model.eval()
    x = torch.randn(1, 1, *spatial)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def main(threads: int = 2, repeats: int = 3, warmup: int = 1, timing: bool = True, only: str = "", output: str = "") -> None:
    """Measure every network and print a markdown table.

    Args:
        threads: ``torch.set_num_threads`` for the CPU forward passes.
        repeats: timed forward passes per network (the median is reported).
        warmup: untimed forward passes before them.
        timing: ``False`` for parameters and FLOPs only (no real forward pass).
        only: measure only the networks of this group, ``student`` or ``teacher``.
        output: also write the table (and its notes) to this markdown file.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    header = (
        "| network | input | params (M) | GFLOPs / sample | paper GFLOPs / sample (Table 2) | ours / paper "
        f"| CPU forward, {threads} threads: median (min) of {repeats}, s |"
    )
    rows = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for group, name, build, spatial, paper_row in _cases():
        if only and group != only:
            continue
        model = build()
        params = count_parameters(model)
        gflops = forward_flops(model, (1, 1, *spatial)) / 1e9
        if paper_row is None:
            paper, ratio = "-", "-"
        else:
            total, batch = PAPER_GFLOPS[paper_row]
            paper, ratio = f"{total / batch:.1f} ({total} / batch {batch})", f"{gflops / (total / batch):.2f}"
        seconds = "-"
        if timing:
            times = forward_seconds(model, spatial, repeats, warmup)
            seconds = f"{statistics.median(times):.2f} ({min(times):.2f})"
        size = "x".join(str(s) for s in spatial)
        rows.append(f"| {name} | {size} | {params / 1e6:.2f} | {gflops:.1f} | {paper} | {ratio} | {seconds} |")
        print(rows[-1], flush=True)
        del model
    table = "\n".join(rows)
    notes = (
        f"\n\nFLOPs: torch.utils.flop_counter, 2 per multiply-add, convolutions and matrix products only."
        f"\nPaper Table 2: {PAPER_PARAMS_M} M parameters (network unnamed), FLOP convention not stated."
        "\nCPU times are batch 1 under torch.inference_mode; other load on the machine inflates the median."
    )
    print("\n" + table + notes)
    if output:
        with open(output, "w") as f:
            f.write(table + "\n" + notes + "\n")


if __name__ == "__main__":
    fire.Fire(main)
