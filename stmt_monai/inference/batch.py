"""The cascade over a file, a folder or a DICOM series: one case at a time, outputs written atomically.

- :func:`output_paths`: ``<case>.nii.gz`` (FLARE naming), ``<case>_report.json`` / ``.csv``,
  ``<case>_preview.png``;
- :func:`segment_case`: one case through a loaded :class:`~stmt_monai.inference.cascade.Cascade`,
  its mask, report (:mod:`stmt_monai.inference.report`) and optional preview
  (:mod:`stmt_monai.inference.preview`) written; an existing mask is skipped unless ``overwrite``;
- :func:`segment_folder`: every case of an input (:func:`stmt_monai.io.find_cases`;
  :func:`shard_cases` splits a batch across processes); a case that fails is recorded with a
  one-line reason and the batch goes on (:class:`BatchResult`).

Used by the ``cascade`` bundle (its ``batch`` id) and by ``stmt-segment`` (:mod:`stmt_monai.cli`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from stmt_monai.inference.cascade import Cascade, CascadeResult
from stmt_monai.io import (
    ImageError,
    case_name,
    find_cases,
    save_label_map,
)

logger = logging.getLogger(__name__)


#: output names beside ``<case>.nii.gz``
REPORT_JSON, REPORT_CSV, PREVIEW_PNG = "_report.json", "_report.csv", "_preview.png"


# ----------------------------------------------------------------------------- cases and outputs
def output_paths(case: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Where a case's outputs go: ``mask`` (``<case>.nii.gz``, FLARE naming), ``report_json``,
    ``report_csv`` and ``preview`` (``<case>_report.json`` / ``.csv``, ``<case>_preview.png``)."""
    name, out = case_name(case), Path(output_dir)
    return {
        "mask": out / f"{name}.nii.gz",
        "report_json": out / f"{name}{REPORT_JSON}",
        "report_csv": out / f"{name}{REPORT_CSV}",
        "preview": out / f"{name}{PREVIEW_PNG}",
    }


def segment_case(
    cascade: Cascade,
    case: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    preview: bool = False,
    report: bool = True,
    strict: bool = False,
    max_memory_bytes: int | None = None,
) -> dict:
    """Segment one case and write its outputs (each written atomically).

    Args:
        cascade: the loaded :class:`Cascade`.
        case: a CT file or DICOM series folder.
        output_dir: destination; see :func:`output_paths`.
        overwrite: redo a case whose mask exists (otherwise it is skipped).
        preview: also write the PNG preview.
        report: write the JSON / CSV report.
        strict: a warning about the input (:mod:`stmt_monai.inference.checks`) fails the case;
            otherwise each is logged as one line and listed in the report's ``warnings``.
        max_memory_bytes: the memory bound of :meth:`Cascade.segment` (default: what is available).

    Returns:
        ``{"case", "status": "written" | "skipped", "outputs": {kind: path}, "timings",
        "warnings": [one line each]}``.

    Raises:
        ImageError: the input cannot be used (other errors propagate as they are).
    """
    paths = output_paths(case, output_dir)
    if paths["mask"].exists() and not overwrite:
        return _skipped(case, paths)
    result = cascade.segment(case, strict=strict, max_memory_bytes=max_memory_bytes)
    return write_case(cascade, case, result, output_dir, preview, report)


def _skipped(case, paths: dict) -> dict:
    return {"case": str(case), "status": "skipped", "outputs": {"mask": str(paths["mask"])}, "timings": {}}


def write_case(
    cascade: Cascade, case: str | os.PathLike, result: CascadeResult, output_dir: str | os.PathLike, preview: bool = False, report: bool = True
) -> dict:
    """Write one segmented case's outputs (each atomically): the mask, the report and the
    optional preview; :func:`segment_case`'s return value."""
    from stmt_monai.inference import report as case_report

    paths = output_paths(case, output_dir)
    for warning in result.warnings:
        logger.warning("%s: %s", case, warning.message)
    clock = time.perf_counter()
    written = {"mask": save_label_map(paths["mask"], result.labels, result.affine)}
    timings = dict(result.timings)
    timings["write"] = time.perf_counter() - clock
    if report:
        clock = time.perf_counter()
        summary = case_report.case_report(
            result.labels, result.affine, result.image, organ_labels=result.organ_labels, case=case_name(case), source=str(case)
        )
        summary["cascade"] = {**cascade.describe(), "roi": result.roi, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
        summary["warnings"] = [warning.as_dict() for warning in result.warnings]
        written["report_json"], written["report_csv"] = case_report.write_report(summary, paths["report_json"], paths["report_csv"])
        timings["report"] = time.perf_counter() - clock
    if preview:
        from stmt_monai.inference.preview import overlay_figure

        clock = time.perf_counter()
        written["preview"] = overlay_figure(
            result.image, result.labels, paths["preview"], affine=result.affine, title=case_name(case), center=_organ_center(result)
        )
        timings["preview"] = time.perf_counter() - clock
    warnings = [warning.message for warning in result.warnings]
    return {"case": str(case), "status": "written", "outputs": {k: str(v) for k, v in written.items()}, "timings": timings, "warnings": warnings}


def _organ_center(result: CascadeResult) -> tuple[int, int, int] | None:
    """Canonical voxel the preview's slices pass through: the centre of the organs' bounding box
    (a single tumor would otherwise pull the views off the organs); None: the viewer's default."""
    from stmt_monai.preprocessing.geometry import to_canonical

    canonical, _, _ = to_canonical(result.labels, result.affine)
    found = np.argwhere(canonical[::2, ::2, ::2] > 0) * 2
    if not found.size:
        return None
    return tuple(int(v) for v in (found.min(0) + found.max(0)) // 2)


@dataclasses.dataclass
class BatchResult:
    """What a batch did: ``written`` and ``skipped`` case paths, ``failed`` as ``(case, reason)``,
    ``warnings``: the input warnings of each written case that had any (``{case: [line, ...]}``)."""

    written: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)
    warnings: dict = dataclasses.field(default_factory=dict)
    #: seconds from the batch's start until each case (in order) was done: the per-case time in a batch
    finished_s: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_if_failed(self) -> "BatchResult":
        """Raise ``RuntimeError`` listing ``case: reason`` lines if some case failed (the
        ``cascade`` bundle's ``run`` ends with it so that a failed case fails the run), else
        return self."""
        if self.failed:
            lines = "\n".join(f"{case}: {reason}" for case, reason in self.failed)
            raise RuntimeError(f"{len(self.failed)} of {len(self.failed) + len(self.written) + len(self.skipped)} cases failed:\n{lines}")
        return self


def failure_reason(case: str | os.PathLike, err: BaseException) -> str:
    """One-line reason of a failed case (``ImageError`` already names the file)."""
    if isinstance(err, ImageError):
        return err.problem
    return " ".join(f"{type(err).__name__}: {err}".split())


def shard_cases(cases: Sequence[Path], shard: str | None) -> list[Path]:
    """Share ``"i/n"`` of ``cases``: every n-th case from the i-th (0-based).

    n processes (one per GPU, or per machine) given shards ``0/n`` ... ``n-1/n`` segment
    disjoint sets of cases that together are all of them; ``None`` keeps every case.

    Raises:
        ValueError: ``shard`` is not ``"i/n"`` with ``0 <= i < n``.
    """
    if shard is None:
        return list(cases)
    try:
        index, count = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard must be 'i/n' (e.g. 0/2), got {shard!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return list(cases)[index::count]


def segment_folder(
    cascade: Cascade,
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    preview: bool = False,
    progress: bool = True,
    shard: str | None = None,
    strict: bool = False,
    max_memory_bytes: int | None = None,
    overlap: bool = True,
) -> BatchResult:
    """Segment every case of ``input`` (:func:`stmt_monai.io.find_cases`; each DICOM series of a
    folder that holds several is a case) into ``output_dir``.

    A case that fails is recorded (path, reason) and the batch goes on. With ``shard`` ``"i/n"``
    only that share of the cases (:func:`shard_cases`), to split a batch across processes.
    ``strict`` and ``max_memory_bytes`` as :func:`segment_case`. Log lines (a warning, a failed
    case) are written above the progress bar, not through it. With ``overlap`` the next case
    is read and the previous one written while the networks run on this one
    (:func:`_overlapped`); results, order and failures are those of the one-by-one loop.

    Returns:
        :class:`BatchResult`; its ``failed`` list is empty when all went well.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    result = BatchResult()
    try:
        cases = shard_cases(find_cases(input, each_series=True), shard)
    except ImageError as err:
        result.failed.append((str(input), err.problem))
        return result
    start = time.perf_counter()
    if overlap:
        outcomes = _overlapped(cascade, cases, output_dir, overwrite, preview, strict, max_memory_bytes)
    else:
        outcomes = ((case, _attempt(segment_case, cascade, case, output_dir, overwrite, preview, True, strict, max_memory_bytes)) for case in cases)
    with logging_redirect_tqdm():
        bar = tqdm(total=len(cases), desc="stmt-segment", unit="case", disable=not progress)
        for case, outcome in outcomes:
            bar.update()
            result.finished_s.append(time.perf_counter() - start)
            if isinstance(outcome, BaseException):
                logger.debug("case %s failed", case, exc_info=outcome)
                result.failed.append((str(case), failure_reason(case, outcome)))
                logger.warning("%s: %s", case, result.failed[-1][1])
                continue
            logger.info("%s: %s %s", case, outcome["status"], outcome["outputs"]["mask"])
            (result.written if outcome["status"] == "written" else result.skipped).append(str(case))
            result.timings[str(case)] = outcome["timings"]
            if outcome.get("warnings"):
                result.warnings[str(case)] = outcome["warnings"]
        bar.close()
    return result


def _attempt(function, *args):
    """``function(*args)``, or the exception it raised (one bad case must not stop the batch)."""
    try:
        return function(*args)
    except Exception as err:  # noqa: BLE001
        return err


def _overlapped(cascade: Cascade, cases: Sequence[Path], output_dir, overwrite: bool, preview: bool, strict: bool, max_memory_bytes):
    """``(case, outcome or exception)`` of each case, in order, with the reading of the next
    case (a thread) and the writing of the previous one (another thread) overlapping this
    case's networks. At most one case is read ahead and one written behind, so memory holds
    three cases at most; what each thread does releases the GIL for its heavy parts (ISA-L,
    numpy, OpenVINO)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(case):
        paths = output_paths(case, output_dir)
        if paths["mask"].exists() and not overwrite:
            return _skipped(case, paths)
        return cascade.read(case, max_memory_bytes)

    def done(value):
        future = Future()
        future.set_result(value)
        return future

    with ThreadPoolExecutor(1, "stmt-read") as reader, ThreadPoolExecutor(1, "stmt-write") as writer:
        reading = reader.submit(_attempt, read, cases[0]) if cases else None
        behind = None  # (case, future of its outcome)
        for i, case in enumerate(cases):
            loaded = reading.result()
            reading = reader.submit(_attempt, read, cases[i + 1]) if i + 1 < len(cases) else None
            if isinstance(loaded, BaseException) or "status" in loaded:
                outcome = done(loaded)  # failed to read, or skipped
            else:
                result = _attempt(cascade.segment_loaded, case, loaded, strict)
                del loaded  # the input volume: the result keeps what the writing needs
                outcome = done(result) if isinstance(result, BaseException) else writer.submit(_attempt, write_case, cascade, case, result, output_dir, preview)
                del result
            if behind is not None:
                yield behind[0], behind[1].result()
            behind = (case, outcome)
        if behind is not None:
            yield behind[0], behind[1].result()
