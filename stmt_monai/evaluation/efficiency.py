"""FLARE-style efficiency of a segmentation command: one process per case, as the challenge runs.

Paper section 3.1 and FLARE23's rules: a case's running time includes start-up and model
loading, so every case is a fresh process and its wall time is taken from start to exit. On a
GPU the device's memory is sampled every 0.1 s as total minus free (NVML; the CUDA context and
anything else on the device counts, as in FLARE), giving the maximum sample and the area under
the memory-time curve, sum of samples x 0.1 s (MB s). On a CPU the peak resident memory of the
process tree and its CPU time are what matter; both are measured on a GPU too.

MB here is 2**20 bytes (MiB), as FLARE's NVML numbers. Linux / Unix only (``os.wait4``).
Processes outside the command's tree (a Docker daemon's container, say) are not in the RSS
and CPU figures; the GPU figures see the whole device.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from stmt_monai.io import case_name, cases_by_name, find_cases, write_csv_atomic, write_text_atomic

logger = logging.getLogger(__name__)

MB = 2**20


#: FLARE23 tolerated 15 s and 4 GB of GPU memory per case (paper section 3.1)
FLARE23_TIME_LIMIT_S = 15.0


FLARE23_GPU_LIMIT_MB = 4096.0


#: columns of a per-case measurement, in table order
MEASURES = ("wall_s", "cpu_s", "peak_rss_mb", "maxrss_mb", "gpu_max_mb", "gpu_auc_mb_s")


EFFICIENCY_CSV = "efficiency.csv"


SUMMARY_CSV = "efficiency_summary.csv"


SUMMARY_MD = "efficiency.md"


class GPUUnavailable(RuntimeError):
    """No GPU memory can be read through NVML; ``str(err)`` says why, in one line."""


class NvmlMemory:
    """Used memory of one GPU as NVML reports it: total minus free, in MB.

    Args:
        index: NVML device index. Default: the first entry of ``CUDA_VISIBLE_DEVICES`` (an
            index or a ``GPU-...`` UUID) if set, else 0.

    Raises:
        GPUUnavailable: ``nvidia-ml-py`` not installed (``pip install stmt-monai[gpu]``), no
            NVML library (no driver), or no such device.
    """

    def __init__(self, index: int | None = None):
        try:
            import pynvml
        except ImportError:
            raise GPUUnavailable("nvidia-ml-py is not installed (pip install 'stmt-monai[gpu]')") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise GPUUnavailable(f"NVML cannot start: {err}") from None
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            if index is None and visible.startswith("GPU-"):
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
            else:
                if index is None:
                    index = int(visible) if visible.isdigit() else 0
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as err:
            pynvml.nvmlShutdown()
            raise GPUUnavailable(f"NVML has no GPU {index if index is not None else visible}: {err}") from None

    def used_mb(self) -> float:
        """Device memory in use now, total minus free, in MB."""
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return (info.total - info.free) / MB

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _tree_rss_and_kill(root: psutil.Process, kill: bool = False) -> int:
    """Sum of the resident memory (bytes) of ``root`` and all its descendants; kill them if asked."""
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:  # exited and reaped already
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            if kill:
                proc.kill()
        except psutil.Error:  # exited between the listing and the reading
            pass
    return total


class _Sampler(threading.Thread):
    """Samples the process tree's RSS and the GPU's used memory at a fixed rate until stopped."""

    def __init__(self, root: psutil.Process, interval: float, gpu: NvmlMemory | None, timeout_s: float | None):
        super().__init__(daemon=True)
        self.root, self.interval, self.gpu, self.timeout_s = root, interval, gpu, timeout_s
        self.rss_bytes: list[int] = []
        self.gpu_mb: list[float] = []
        self.timed_out = False
        self.gpu_error = ""
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        k = 0
        while not self._stop_event.is_set():
            kill = self.timeout_s is not None and time.monotonic() - start > self.timeout_s
            self.rss_bytes.append(_tree_rss_and_kill(self.root, kill))
            if self.gpu is not None:
                try:
                    self.gpu_mb.append(self.gpu.used_mb())
                except Exception as err:  # an NVML error must not stop the RSS samples or the timeout
                    self.gpu_error, self.gpu = f"{type(err).__name__}: {err}", None
            if kill:
                self.timed_out = True
                return
            k += 1
            # a fixed schedule (not sleep(interval)) so the sample rate does not drift
            self._stop_event.wait(max(0.0, start + k * self.interval - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _rusage_maxrss_mb(usage) -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    return usage.ru_maxrss / (MB if sys.platform == "darwin" else 1024)


def measure_command(
    argv: Sequence[str] | str,
    poll_interval: float = 0.1,
    gpu: bool | NvmlMemory | None = None,
    timeout_s: float | None = None,
    log_path: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> dict:
    """Run one command in a new process and measure it as FLARE does.

    Args:
        argv: the command, as a list of arguments or one shell-like string (split by ``shlex``).
        poll_interval: seconds between memory samples (FLARE: 0.1).
        gpu: ``None``: sample GPU memory if NVML finds a device; ``False``: never; ``True``:
            required (raises :class:`GPUUnavailable` otherwise); or an open :class:`NvmlMemory`.
        timeout_s: kill the process tree after this many seconds (``timed_out`` is then true).
        log_path: file for the command's stdout and stderr; default: inherited.
        cwd, env: working directory and environment of the command.

    Returns:
        ``{"wall_s", "cpu_s", "peak_rss_mb", "maxrss_mb", "gpu_max_mb", "gpu_auc_mb_s",
        "gpu_samples", "returncode", "timed_out", "gpu_error"}``:

        - ``wall_s``: start to exit, s (start-up and model loading included).
        - ``cpu_s``: user + system CPU time of the process and every descendant it waited for,
          s (the kernel's ``wait4`` accounting).
        - ``peak_rss_mb``: the largest sum of resident memory over the whole process tree
          (the command and all its descendants, psutil), sampled every ``poll_interval``; a
          peak shorter than a poll can be missed.
        - ``maxrss_mb``: cross-check, the kernel's high-water mark of the largest single
          process of the tree (``wait4`` rusage, the per-child form of
          ``getrusage(RUSAGE_CHILDREN).ru_maxrss``). It misses no peak, but Linux counts in it
          the memory of the measuring process at the fork, so it reads high by up to that
          process's size (about 50 MB for ``stmt-efficiency``).
        - ``gpu_max_mb``: largest sample of total minus free device memory; ``gpu_auc_mb_s``:
          sum of samples x ``poll_interval``; ``gpu_samples``: how many. NaN / 0 without a GPU.
        - ``returncode``: the command's exit status (negative: killed by that signal).
        - ``gpu_error``: empty, or why GPU sampling stopped early (an NVML error).

    Raises:
        OSError: the command cannot be started (e.g. not found).
        GPUUnavailable: ``gpu=True`` and no NVML device.
    """
    argv = shlex.split(argv) if isinstance(argv, str) else [str(a) for a in argv]
    own_gpu = gpu is None or gpu is True
    device = None
    if isinstance(gpu, NvmlMemory):
        device = gpu
    elif gpu is True:
        device = NvmlMemory()
    elif gpu is None:
        try:
            device = NvmlMemory()
        except GPUUnavailable:
            device = None
    log = open(log_path, "wb") if log_path is not None else None
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT if log else None, cwd=cwd, env=env)
        root = psutil.Process(proc.pid)  # safe: the child stays unreaped until wait4 below
        sampler = _Sampler(root, poll_interval, device, timeout_s)
        sampler.start()
        try:
            # blocking wait4 (not a poll loop) stops the clock at the exit, and gives the child's
            # rusage: its own and its reaped descendants' CPU time and high-water RSS
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # e.g. Ctrl-C: leave no orphaned command behind
            sampler.stop()
            _tree_rss_and_kill(root, kill=True)
            proc.wait()
            raise
        wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        sampler.stop()
    finally:
        if log is not None:
            log.close()
        if device is not None and own_gpu:
            device.close()
    samples = sampler.gpu_mb
    return {
        "wall_s": wall_s,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": max(sampler.rss_bytes, default=0) / MB,
        "maxrss_mb": _rusage_maxrss_mb(usage),
        "gpu_max_mb": max(samples) if samples else math.nan,
        "gpu_auc_mb_s": sum(samples) * poll_interval if samples else math.nan,
        "gpu_samples": len(samples),
        "returncode": proc.returncode,
        "timed_out": sampler.timed_out,
        "gpu_error": sampler.gpu_error,
    }


def case_command(command_template: str, input_path: str | os.PathLike, output_dir: str | os.PathLike) -> list[str]:
    """The argv of one case: the template split like a shell line, placeholders filled in.

    Args:
        command_template: e.g. ``"stmt-segment {input} {output}"``. Placeholders: ``{input}``
            the case's image file, ``{output}`` the output folder, ``{case}`` the case name
            (``{output}/{case}.nii.gz`` names a FLARE prediction file). Other braces stay as
            they are, so ``python -c "..."`` templates need no escaping.
        input_path: the case's image file.
        output_dir: the output folder.
    """
    values = {"{input}": str(input_path), "{output}": str(output_dir), "{case}": case_name(input_path)}
    argv = []
    for token in shlex.split(command_template):
        for key, value in values.items():
            token = token.replace(key, value)
        argv.append(token)
    return argv


def summarize_efficiency(rows: Sequence[Mapping]) -> dict:
    """Mean, median and maximum of each measure over cases, and FLARE23 limit counts.

    Args:
        rows: per-case measurements (:func:`measure_command` results).

    Returns:
        ``{"num_cases", "num_failed", "over_time_limit", "over_gpu_limit", "per_measure":
        {measure: {"mean", "median", "max"}}}``; failed = nonzero exit or timed out; NaN
        measures (no GPU) stay NaN.
    """
    per_measure = {}
    for measure in MEASURES:
        values = np.array([float(r[measure]) for r in rows])
        finite = values[~np.isnan(values)] if values.size else values
        per_measure[measure] = {
            name: float(fn(finite)) if finite.size else math.nan
            for name, fn in (("mean", np.mean), ("median", np.median), ("max", np.max))
        }
    return {
        "num_cases": len(rows),
        "num_failed": sum(1 for r in rows if r["returncode"] != 0 or r["timed_out"]),
        "over_time_limit": sum(1 for r in rows if r["wall_s"] > FLARE23_TIME_LIMIT_S),
        "over_gpu_limit": sum(1 for r in rows if r["gpu_max_mb"] > FLARE23_GPU_LIMIT_MB),
        "per_measure": per_measure,
    }


def efficiency_markdown(summary: Mapping, rows: Sequence[Mapping] = ()) -> str:
    """Markdown summary table (mean / median / max per measure), then the failed cases."""

    def fmt(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}"

    lines = [
        f"Efficiency: {summary['num_cases']} cases, {summary['num_failed']} failed; "
        f"over FLARE23 limits: {summary['over_time_limit']} > {FLARE23_TIME_LIMIT_S:g} s, "
        f"{summary['over_gpu_limit']} > {FLARE23_GPU_LIMIT_MB:g} MB GPU",
        "",
        "| measure | mean | median | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {m} | {fmt(s['mean'])} | {fmt(s['median'])} | {fmt(s['max'])} |" for m, s in summary["per_measure"].items()
    ]
    failed = [r for r in rows if r["returncode"] != 0 or r["timed_out"]]
    if failed:
        lines += ["", "Failed:"]
        lines += [
            f"- {r['case']}: " + ("timed out" if r["timed_out"] else f"exit status {r['returncode']}") for r in failed
        ]
    return "\n".join(lines) + "\n"


def measure_folder(
    command_template: str,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    report_dir: str | os.PathLike | None = None,
    poll_interval: float = 0.1,
    gpu: bool | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Run a segmentation command once per case of a folder, a new process each, and measure it.

    A case whose command fails (nonzero exit, timeout) is measured and listed, not fatal.

    Args:
        command_template: see :func:`case_command`, e.g. ``"stmt-segment {input} {output}"``.
        input_dir: folder of CT images (``<case>_0000.nii.gz`` or ``<case>.nii.gz``, DICOM series
            folders; :func:`stmt_monai.io.find_cases`); inputs that share a case name are left out.
        output_dir: folder the command writes into (created).
        report_dir: where ``efficiency.csv`` (per case), ``efficiency_summary.csv``,
            ``efficiency.md`` and ``logs/<case>.log`` (each command's output) go; default
            ``output_dir``.
        poll_interval, gpu, timeout_s: see :func:`measure_command`.
        progress: show a progress bar.

    Returns:
        ``(rows, summary)``: one dict per case (``case``, ``input`` and the
        :func:`measure_command` result) and :func:`summarize_efficiency` of them.

    Raises:
        OSError: the command cannot be started at all.
    """
    output_dir = Path(output_dir)
    report_dir = Path(report_dir) if report_dir is not None else output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "logs").mkdir(parents=True, exist_ok=True)
    device = None
    if gpu is not False:
        try:
            device = NvmlMemory()
        except GPUUnavailable:
            if gpu:
                raise
    rows = []
    try:
        cases, shared = cases_by_name(find_cases(input_dir))
        for case, paths in shared.items():
            logger.warning("%s: not measured, %d inputs share its name (%s)", case, len(paths), ", ".join(p.name for p in paths))
        for case, path in tqdm(cases.items(), desc="efficiency", unit="case", disable=not progress):
            result = measure_command(
                case_command(command_template, path, output_dir),
                poll_interval=poll_interval,
                gpu=device if device is not None else False,
                timeout_s=timeout_s,
                log_path=report_dir / "logs" / f"{case}.log",
            )
            rows.append({"case": case, "input": str(path)} | result)
    finally:
        if device is not None:
            device.close()
    summary = summarize_efficiency(rows)
    columns = ["case", "input", *MEASURES, "gpu_samples", "returncode", "timed_out", "gpu_error"]
    write_csv_atomic(report_dir / EFFICIENCY_CSV, columns, rows)
    summary_rows = [{"measure": m} | s for m, s in summary["per_measure"].items()]
    write_csv_atomic(report_dir / SUMMARY_CSV, ["measure", "mean", "median", "max"], summary_rows)
    write_text_atomic(report_dir / SUMMARY_MD, efficiency_markdown(summary, rows))
    return rows, summary
