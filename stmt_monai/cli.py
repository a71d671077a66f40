"""``stmt-segment``: the StMt cascade on the command line (python-fire over :mod:`stmt_monai.inference.cascade`).

    stmt-segment CT.nii.gz out/                     # one file
    stmt-segment scans/ out/ --preview              # every case of a folder, with PNG previews
    stmt-segment dicom_series/ out/ --device cuda   # one DICOM series folder
    stmt-segment scans/ out/ --device cuda:1 --shard 1/2   # the second half of a batch split in two

Writes ``out/<case>.nii.gz`` (FLARE naming, the input's exact shape and affine),
``out/<case>_report.json`` / ``.csv`` and, with ``--preview``, ``out/<case>_preview.png``.
Exit status 0 when every case was written or skipped, 1 when some failed (each listed as
``file: reason`` on stderr), 2 when the models could not be loaded.

The other console commands (``pyproject.toml``), each python-fire over one package function:

- ``stmt-prepare-data``: triage a dataset, write every stage's datalists (:func:`prepare_data`);
- ``stmt-make-cohort``: a synthetic FLARE23-like cohort from the shipped CT (:func:`make_cohort`);
- ``stmt-evaluate``: FLARE23 DSC and NSD of a folder of predictions (:func:`evaluate`);
- ``stmt-efficiency``: FLARE-style time and memory of a command, per case (:func:`efficiency`);
- ``stmt-export``: TorchScript / ONNX of a stage bundle's network (:func:`export`);
- ``stmt-train-demo``: the shipped demo weights (:func:`stmt_monai.training.demo.train_demo`).

Each exits 2 with one line ``<command>: <problem>`` on stderr for bad arguments or data, and 1
when a bundle workflow it runs fails (the line names its log).
"""

from __future__ import annotations

import logging
import os
import sys
import time

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
    strict: bool = False,
    max_memory_gb: float | None = None,
    dicom_seg: bool = False,
    outside_tumors: bool = False,
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
        threads: CPU threads for the networks (default: ``OMP_NUM_THREADS`` when set, else the
            backend's own choice, one per physical core).
        backend: ``auto`` (OpenVINO on the CPU when installed, as ``scripts/install.sh`` does;
            torch on CUDA), ``torch``, ``openvino`` (CPU), ``torchscript`` or ``onnx`` (CPU, ONNX Runtime; ``pip install 'stmt-monai[export]'``): the
            files ``stmt-export bundles/<stage bundle>`` writes beside each bundle's weights.
        weights: ``auto`` (trained weights if present, else the demo weights), ``trained``, ``demo``.
        progress: show a progress bar.
        shard: ``i/n``: only every n-th case from the i-th (0-based), so that n processes (e.g. one
            per GPU, ``--device cuda:i``) segment disjoint shares of a folder into one output folder.
        amp: fp16 autocast of the networks on CUDA (default there; ``--amp False`` for fp32).
        precision: OpenVINO's: ``auto`` (bf16 where the CPU computes in bf16, else f32), ``f32``,
            ``bf16`` or ``int8`` (the NNCF models ``stmt-export BUNDLE --formats
            openvino_int8`` writes beside each bundle's weights).
        strict: an input warning (not CT intensities, implausible spacing, non-finite voxels,
            little or no abdomen in the field of view, DICOM slices filled or resampled, a
            misnamed file format; ``docs/input_checks.md``) fails the case instead of being
            logged and listed in the report's ``warnings``.
        max_memory_gb: refuse, before reading, a case whose estimated peak memory exceeds this
            (default: the memory available when the case starts).
        dicom_seg: also write each DICOM series case's label map as a DICOM Segmentation,
            ``<case>_seg.dcm`` (one segment per label present, SNOMED CT coded, referencing the
            source series; :func:`stmt_monai.inference.dicom_seg.write_dicom_seg`).
        outside_tumors: also look for tumors outside stage 1's abdomen box (one more pass of the
            tumor network over the whole volume; not in the paper, off by default:
            ``docs/outside_roi_tumors.md`` has what it finds and costs).

    Returns:
        the :class:`~stmt_monai.inference.batch.BatchResult` (failed cases with their reasons).
    """
    start_up = _process_seconds()  # Python and the imports, before any model is read
    cascade = Cascade(
        bundles_dir, device=device, threads=threads, backend=backend, weights=weights, amp=amp, precision=precision, outside_tumors=outside_tumors
    )
    cascade.start_up_seconds = start_up
    max_memory_bytes = None if max_memory_gb is None else int(float(max_memory_gb) * 1e9)
    result = segment_folder(
        cascade, input, output_dir, overwrite=overwrite, preview=preview, progress=progress, shard=shard, strict=strict, max_memory_bytes=max_memory_bytes
    )
    if dicom_seg:
        _write_dicom_segs(result, output_dir)
    print(
        f"stmt-segment: {len(result.written)} written, {len(result.skipped)} skipped (exist; --overwrite to redo), "
        f"{len(result.failed)} failed -> {os.path.abspath(output_dir)}",
        file=sys.stderr,
    )
    if result.warnings:
        print(f"stmt-segment: {len(result.warnings)} written with input warnings (in their reports' warnings; --strict fails them)", file=sys.stderr)
    for case, reason in result.failed:
        print(f"{case}: {reason}", file=sys.stderr)
    return result


def _write_dicom_segs(result: BatchResult, output_dir: str) -> None:
    """``--dicom_seg``: the DICOM SEG of each written (or kept) case that is a DICOM series folder,
    from its mask; a case whose SEG cannot be written joins ``result.failed`` (one line)."""
    from pathlib import Path

    from stmt_monai.inference.batch import output_paths
    from stmt_monai.inference.dicom_seg import SEG_SUFFIX, write_dicom_seg
    from stmt_monai.io import ImageError

    for case in result.written + result.skipped:
        if not Path(case).is_dir():
            continue
        mask = output_paths(case, output_dir)["mask"]
        try:
            write_dicom_seg(mask, case, mask.with_name(mask.name.removesuffix(".nii.gz") + SEG_SUFFIX))
        except (ImageError, ValueError) as err:
            result.failed.append((case, f"DICOM SEG: {err}"))


#: bad arguments, data or set-up: one line ``<command>: <problem>`` on stderr, exit status 2
USAGE_ERRORS = (FileNotFoundError, NotADirectoryError, RuntimeError, ValueError, ImportError)


def run_command(name: str, function, argv: list[str] | None = None, info: bool = False):
    """Run ``function`` as the console command ``name``: python-fire parses ``argv`` (default
    ``sys.argv``) into its arguments; its return value (not printed).

    Args:
        name: the command's name, as errors and ``--help`` show it.
        function: the package function behind the command.
        argv: the arguments (tests pass them).
        info: show the package's progress messages (``INFO`` log records of ``stmt_monai``).

    Exits 1 with ``<name>: <error>`` on stderr when a bundle workflow failed
    (:class:`stmt_monai.bundle.WorkflowFailed`, the message names its log), 2 on
    :data:`USAGE_ERRORS`.
    """
    import fire

    from stmt_monai.bundle import WorkflowFailed

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if info:
        logging.getLogger("stmt_monai").setLevel(logging.INFO)
    try:
        return fire.Fire(function, command=argv, name=name, serialize=lambda _: None)
    except WorkflowFailed as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(1)
    except USAGE_ERRORS as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(2)


def _process_seconds() -> float | None:
    """Seconds since this process started (its start-up so far: the reports' ``start_up_seconds``)."""
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # noqa: BLE001 - a figure for the report, never a reason to fail
        return None


def segment_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-segment`` (``pyproject.toml``): exit 1 if any case failed."""
    result = run_command("stmt-segment", segment, argv)
    if isinstance(result, BatchResult):
        sys.exit(0 if result.ok else 1)


# ----------------------------------------------------------------------------- data
def prepare_data(
    data_root: str,
    out_dir: str | None = None,
    fingerprint: bool = True,
    validation_share: float = 0.2,
    fingerprint_cases: int = 100,
    verify_images: bool = False,
    seed: int = 0,
    progress: bool = True,
):
    """Triage a dataset into the paper's data categories and write every stage's datalists.

        stmt-prepare-data --data_root data/cohort --out_dir data/cohort/prepared

    Prints the counts table, every skipped file (one line each) and the files written. See
    :func:`stmt_monai.data.triage.triage_dataset` for the arguments.

    Args:
        data_root: a FLARE23-layout folder (``imagesTr``, ``labelsTr``, ``unlabeled``, optional
            ``validation/`` and ``test/``) or a MONAI datalist JSON.
        out_dir: where the datalists go; default ``<data_root>/prepared``.

    Raises:
        ValueError: not a dataset, or no case at all could be read.
    """
    from stmt_monai.data.triage import triage_dataset

    result = triage_dataset(
        data_root,
        out_dir,
        fingerprint=fingerprint,
        validation_share=validation_share,
        fingerprint_cases=fingerprint_cases,
        verify_images=verify_images,
        seed=seed,
        progress=progress,
    )
    print(result.table())
    for failure in result.failed:
        print(f"skipped: {failure['error']}")
    for kind, path in sorted(result.outputs.items()):
        print(f"{kind}: {path}")
    if not result.cases and not result.validation and not result.test:
        raise ValueError(f"{data_root}: no case could be read")
    return result


def make_cohort(out: str = "data/cohort", seed: int = 0, workers: int = 1, preview: str | None = None, progress: bool = True, **config):
    """Generate a synthetic FLARE23-like cohort from the shipped real CT.

        stmt-make-cohort --out data/cohort --num_labelled 60 --num_unlabelled 24 \\
            --num_validation 8 --num_test 8 --size 96 --seed 0 [--workers 2] [--preview docs/cohort_examples.png]

    Prints the triage-style counts of the annotation policy, the time taken and the disk used.

    Args:
        out: the cohort's folder (FLARE23 layout, :func:`stmt_monai.synthetic.annotation.make_cohort`).
        seed, workers, progress: see :func:`stmt_monai.synthetic.annotation.make_cohort`.
        preview: also draw three of the generated cases with their full truth into this PNG
            (``docs/cohort_examples.png`` is made with the defaults).
        config: fields of :class:`stmt_monai.synthetic.config.CohortConfig` (``--fully_share 0.2``).

    Raises:
        ValueError: an option that is not a ``CohortConfig`` field.
    """
    import dataclasses
    import time
    from pathlib import Path

    from stmt_monai.data.triage import format_table
    from stmt_monai.synthetic.annotation import make_cohort as generate
    from stmt_monai.synthetic.config import CohortConfig
    from stmt_monai.synthetic.preview import cohort_preview

    fields = {f.name for f in dataclasses.fields(CohortConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; CohortConfig fields: {sorted(fields)}")
    cfg = CohortConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    start = time.perf_counter()
    policy = generate(out, cfg, seed=seed, workers=workers, progress=progress)
    seconds = time.perf_counter() - start
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    megabytes = sum(p.stat().st_size for p in files) / 2**20
    n = len(policy["cases"])
    print(format_table(policy["counts"]))
    print(
        f"{n} cases in {seconds:.1f} s ({seconds / max(n, 1):.2f} s per case, {workers} worker(s)); "
        f"{len(files)} files, {megabytes:.1f} MiB in {out}"
    )
    if preview:
        print(f"preview: {cohort_preview(out, preview)}")
    return policy


def prepare_data_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-prepare-data``."""
    run_command("stmt-prepare-data", prepare_data, argv)


def make_cohort_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-make-cohort``."""
    run_command("stmt-make-cohort", make_cohort, argv)


# ----------------------------------------------------------------------------- evaluation
def evaluate(pred_dir: str, gt_dir: str, out_dir: str | None = None, classes=None, check_affine: bool = True, progress: bool = True):
    """Score a folder of predicted label maps against ground truth by the official FLARE23 rules.

        stmt-evaluate --pred_dir out/ --gt_dir labels/ --out_dir eval/
        stmt-evaluate out/ labels/ --classes=5,6,10   # aorta, IVC, esophagus only

    Files pair by case name (``<case>.nii.gz`` in both folders). Writes ``per_case.csv``,
    ``summary.csv``, ``summary.md`` and ``problems.csv`` into ``out_dir`` and prints the summary
    table; a missing or mismatched case is listed, not fatal.

    Args:
        pred_dir: folder of predictions ``<case>.nii.gz``.
        gt_dir: folder of ground truth ``<case>.nii.gz`` (its headers give the spacing).
        out_dir: folder for the tables; default ``<pred_dir>/eval``.
        classes: FLARE label numbers to score, e.g. ``--classes=1,2,3``; default 1..14.
        check_affine: require the prediction's affine to match the ground truth's.
        progress: show a progress bar.

    Returns:
        the summary (:func:`stmt_monai.evaluation.metrics.summarize`).
    """
    from pathlib import Path

    from stmt_monai.evaluation.scoring import evaluate_folder, summary_markdown
    from stmt_monai.labels import LABELS

    out_dir = Path(pred_dir) / "eval" if out_dir is None else Path(out_dir)
    classes = tuple(LABELS) if classes is None else classes
    _, summary, problems = evaluate_folder(pred_dir, gt_dir, out_dir, classes=classes, check_affine=check_affine, progress=progress)
    print(summary_markdown(summary, problems), end="")
    print(f"tables written to {out_dir}")
    return summary


def efficiency(
    command: str,
    input_dir: str,
    output_dir: str,
    report_dir: str | None = None,
    gpu: bool | None = None,
    timeout_s: float | None = None,
    poll_interval: float = 0.1,
    progress: bool = True,
):
    """FLARE-style efficiency of a segmentation command over a folder, one new process per case.

        stmt-efficiency "stmt-segment {input} {output}" --input_dir ct/ --output_dir out/
        stmt-efficiency "stmt-segment {input} {output}" ct/ out/ --timeout_s=60 --gpu=True

    Per case: wall time (start-up and model loading included), CPU time, peak RSS of the process
    tree, and on a GPU (NVML, ``pip install 'stmt-monai[gpu]'``) the maximum and the area under
    the curve of device memory sampled every 0.1 s as total minus free. Writes
    ``efficiency.csv``, ``efficiency_summary.csv``, ``efficiency.md`` and ``logs/`` into
    ``report_dir`` and prints the summary table
    (:func:`stmt_monai.evaluation.efficiency.measure_folder`).

    Args:
        command: template with ``{input}`` (the case's CT), ``{output}`` (the output folder),
            ``{case}``, quoted as one argument.
        input_dir: folder of CT images.
        output_dir: folder the command writes its predictions into.
        report_dir: folder for the tables and logs; default ``output_dir``.
        gpu: sample GPU memory: default if NVML finds a device; ``True`` requires one.
        timeout_s: kill a case after this many seconds.
        poll_interval: seconds between memory samples (FLARE: 0.1).
        progress: show a progress bar.

    Returns:
        the summary (:func:`stmt_monai.evaluation.efficiency.summarize_efficiency`).
    """
    from stmt_monai.evaluation.efficiency import efficiency_markdown, measure_folder

    rows, summary = measure_folder(
        command, input_dir, output_dir, report_dir=report_dir, poll_interval=poll_interval, gpu=gpu, timeout_s=timeout_s, progress=progress
    )
    print(efficiency_markdown(summary, rows), end="")
    print(f"tables written to {report_dir or output_dir}")
    return summary


def evaluate_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-evaluate``."""
    run_command("stmt-evaluate", evaluate, argv)


def efficiency_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-efficiency``."""
    run_command("stmt-efficiency", efficiency, argv)


# ----------------------------------------------------------------------------- bundles
def export(bundle_root: str, weights: str = "auto", formats: str | tuple | None = None, check: bool = True, calibration: str | None = None) -> dict:
    """Export a stage bundle's network beside its weights: ``model.ts`` (TorchScript, MONAI's
    ``ckpt_export``) and ``model.onnx`` (ONNX), which ``stmt-segment --backend torchscript`` /
    ``--backend onnx`` run.

        stmt-export bundles/organ_selftrain                      # models/model.ts, models/model.onnx
        stmt-export bundles/tumor_meanteacher --weights demo     # models/demo/model.{ts,onnx}
        stmt-export bundles/coarse_abdomen --formats onnx
        stmt-export bundles/organ_selftrain --formats openvino_int8 --calibration my_cts/   # model.int8.xml

    ONNX needs the optional extra: ``pip install 'stmt-monai[export]'``. ``openvino_int8`` (NNCF
    post-training quantisation, run by ``stmt-segment --precision int8``) calibrates on the inputs
    the cascade makes for a few CTs, so the other two stage bundles must sit beside this one.

    Args:
        bundle_root: the stage bundle.
        weights: ``auto``, ``trained`` or ``demo``.
        formats: comma-separated, from :data:`stmt_monai.inference.export.FORMATS`; default all.
        check: log each export's largest difference from the eager network.
        calibration: ``openvino_int8``: a CT file or folder to calibrate on (default: the shipped
            CT and generated cases).

    Returns:
        ``{format: written file}`` (:func:`stmt_monai.inference.export.export_bundle`).
    """
    from stmt_monai.inference.export import FORMATS, export_bundle

    formats = list(FORMATS) if formats is None else formats.split(",") if isinstance(formats, str) else list(formats)
    written = export_bundle(bundle_root, weights, formats, check, calibration)
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return written


def export_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-export``."""
    run_command("stmt-export", export, argv, info=True)


def train_demo_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-train-demo`` (:func:`stmt_monai.training.demo.train_demo`)."""
    from stmt_monai.training.demo import train_demo

    run_command("stmt-train-demo", train_demo, argv, info=True)


def train_main(argv: list[str] | None = None) -> None:
    """Entry point of ``stmt-train``: the whole training chain (:func:`stmt_monai.training.chain.train_chain`);
    exit 1 if a step failed (its log named), 2 on bad arguments or data."""
    from stmt_monai.training.chain import train_chain

    run_command("stmt-train", train_chain, argv)


if __name__ == "__main__":
    segment_main()
