"""``stmt-segment``: the StMt cascade on the command line (python-fire over :mod:`stmt_monai.inference.cascade`).

    stmt-segment CT.nii.gz out/                     # one file
    stmt-segment scans/ out/ --preview              # every case of a folder, with PNG previews
    stmt-segment dicom_series/ out/ --device cuda   # one DICOM series folder
    stmt-segment scans/ out/ --device cuda:1 --shard 1/2   # the second half of a batch split in two

Writes ``out/<case>.nii.gz`` (FLARE naming, the input's exact shape and affine),
``out/<case>_report.json`` / ``.csv`` and, with ``--preview``, ``out/<case>_preview.png``.
Exit status 0 when every case was written or skipped, 1 when some failed (each listed as
``file: reason`` on stderr), 2 when the models could not be loaded.
"""

from __future__ import annotations

import logging
import os
import sys

from stmt_monai.inference.batch import BatchResult, segment_folder
from stmt_monai.inference.cascade import Cascade


def segment(
    input: str,
    output_dir: str,
    device: str = "cpu",
    overwrite: bool = False,
    preview: bool = False,
    bundles_dir: str | None = None,
    threads: int | None = None,
    backend: str = "auto",
    weights: str = "auto",
    progress: bool = True,
    shard: str | None = None,
    amp: bool | None = None,
    precision: str = "auto",
) -> BatchResult:
    """Segment a CT file, a folder of CTs or a DICOM series folder into FLARE label maps.

    Args:
        input: a ``.nii``/``.nii.gz``/``.mha``/``.nrrd`` file, a DICOM series folder, or a folder of
            such files and DICOM series sub-folders.
        output_dir: where ``<case>.nii.gz``, ``<case>_report.json``/``.csv`` (and
            ``<case>_preview.png``) go; created if missing.
        device: ``cpu`` or ``cuda``.
        overwrite: redo cases whose mask already exists (default: skip them).
        preview: write a PNG with axial, coronal and sagittal slices and the label overlay.
        bundles_dir: folder of the three stage bundles (default: the repository's ``bundles/``).
        threads: CPU threads for the networks (default: torch's).
        backend: ``auto`` (OpenVINO on the CPU when installed, as ``scripts/install.sh`` does;
            torch on CUDA), ``torch``, ``openvino`` (CPU), ``torchscript`` or ``onnx`` (CPU, ONNX Runtime; ``pip install 'stmt-monai[export]'``): the
            files ``python scripts/export.py bundles/<stage bundle>`` writes beside each bundle's weights.
        weights: ``auto`` (trained weights if present, else the demo weights), ``trained``, ``demo``.
        progress: show a progress bar.
        shard: ``i/n``: only every n-th case from the i-th (0-based), so that n processes (e.g. one
            per GPU, ``--device cuda:i``) segment disjoint shares of a folder into one output folder.
        amp: fp16 autocast of the networks on CUDA (default there; ``--amp False`` for fp32).
        precision: OpenVINO's: ``auto`` (bf16 where the CPU computes in bf16, else f32), ``f32``,
            ``bf16`` or ``int8`` (the NNCF models ``python scripts/export.py BUNDLE --formats
            openvino_int8`` writes beside each bundle's weights).

    Returns:
        the :class:`~stmt_monai.inference.batch.BatchResult` (failed cases with their reasons).
    """
    cascade = Cascade(bundles_dir, device=device, threads=threads, backend=backend, weights=weights, amp=amp, precision=precision)
    result = segment_folder(cascade, input, output_dir, overwrite=overwrite, preview=preview, progress=progress, shard=shard)
    print(
        f"stmt-segment: {len(result.written)} written, {len(result.skipped)} skipped (exist; --overwrite to redo), "
        f"{len(result.failed)} failed -> {os.path.abspath(output_dir)}",
        file=sys.stderr,
    )
    for case, reason in result.failed:
        print(f"{case}: {reason}", file=sys.stderr)
    return result


def segment_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-segment`` (``pyproject.toml``): exit 1 if any case failed."""
    import fire

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = fire.Fire(segment, command=argv, serialize=lambda _: None)
    except (FileNotFoundError, RuntimeError, ValueError, ImportError) as err:
        print(f"stmt-segment: {err}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, BatchResult):
        sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    segment_main()
