"""FLARE-style efficiency of a segmentation command over a folder, one process per case.

    python scripts/efficiency.py "stmt-segment {input} {output}" --input_dir ct/ --output_dir out/
    python scripts/efficiency.py "stmt-segment {input} {output}" ct/ out/ --timeout_s=60 --gpu=True

Placeholders: ``{input}`` (the case's CT file), ``{output}`` (the output folder), ``{case}``.
Per case: wall time (start-up and model loading included), CPU time, peak RSS of the process
tree, and on a GPU (NVML, ``pip install 'stmt-monai[gpu]'``) the maximum and the area under the
curve of device memory sampled every 0.1 s as total minus free. Writes ``efficiency.csv``,
``efficiency_summary.csv``, ``efficiency.md`` and ``logs/`` into ``report_dir`` (default
``output_dir``) and prints the summary table. See :func:`stmt_monai.evaluation.efficiency.measure_folder`.
"""

from __future__ import annotations

import fire

from stmt_monai.evaluation.efficiency import efficiency_markdown, measure_folder


def main(
    command: str,
    input_dir: str,
    output_dir: str,
    report_dir: str | None = None,
    gpu: bool | None = None,
    timeout_s: float | None = None,
    poll_interval: float = 0.1,
) -> None:
    """Measure ``command`` on every image of ``input_dir``; see the module docstring.

    Args:
        command: command template with ``{input}`` / ``{output}`` / ``{case}``, quoted as one argument.
        input_dir: folder of CT images.
        output_dir: folder the command writes its predictions into.
        report_dir: folder for the tables and logs; default ``output_dir``.
        gpu: sample GPU memory: default if NVML finds a device; ``True`` requires one.
        timeout_s: kill a case after this many seconds.
        poll_interval: seconds between memory samples (FLARE: 0.1).
    """
    rows, summary = measure_folder(
        command, input_dir, output_dir, report_dir=report_dir, poll_interval=poll_interval, gpu=gpu, timeout_s=timeout_s
    )
    print(efficiency_markdown(summary, rows), end="")
    print(f"tables written to {report_dir or output_dir}")


if __name__ == "__main__":
    fire.Fire(main)
