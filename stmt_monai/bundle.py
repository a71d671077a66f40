"""Running a bundle's workflow: which config files make it up, and the one command that runs it.

Every place that runs a bundle workflow (``stmt-train``, the ablation, ``stmt-train-demo``,
the export, the tests) goes through :func:`config_files` (the layering rule) and
:func:`bundle_command` / :func:`run_workflow` (``python -m monai.bundle run``, or ``torchrun``
for several processes), so that a user's command line and the project's own runs are the same.

Overrides are ``--key value`` pairs as ``monai.bundle run`` takes them (python-fire parses the
value): :func:`override_args` writes lists, tuples and booleans so that they parse back to the
same Python value.

Weights carry their network: every training run writes, beside its best weights, the network and
input-size keys it was given (:func:`write_record`: ``models/model.pt`` -> ``models/model.json``,
``models/teacher.pt`` -> ``models/teacher.json``), a flat JSON of config ids that layers like any
override file. :func:`stmt_monai.inference.bundles.bundle_config` (cascade, export, MONAI Label)
applies it before the network is built; a ``monai.bundle run`` of the inference or evaluation
workflow takes it as ``--args_file`` (:func:`bundle_command` ``args_file``). Tools that read a
bundle's config alone (MONAI Label's stock bundle tasks, the model zoo's checks, a plain
``monai.bundle run --config_file configs/inference.json``) get it from the config itself: the
network and input-size keys of ``inference.json`` and ``train.json`` are
``"$stmt_monai.bundle.recorded(@model_path, '<key>', <the paper's value>, @new_model)"``
(:func:`recorded`); a training run from a prepared dataset starts a new model (:func:`new_model`)
and builds the config's network, not the one of the weights it will replace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: configs of every bundle beside the workflow's own file
METADATA, LOGGING = "metadata.json", "logging.conf"
#: the override file of the shipped demo weights (reduced network), layered last
DEMO_CONFIG = "demo.json"
#: the file ``torchrun`` layers on top of a training workflow for several processes
MULTI_GPU_PREFIX = "multi_gpu_"
#: workflows whose config is layered over another one's, as the MONAI model zoo layers them
#: (``evaluate.json`` over ``train.json``); every other workflow's config stands alone
LAYERED_OVER = {"evaluate": "train"}
#: config files that are not a workflow of their own
NOT_WORKFLOWS = ("metadata", "demo")


#: suffix of a weights file's record: ``model.pt`` -> ``model.json``
RECORD_SUFFIX = ".json"


def record_path(weights: str | os.PathLike) -> Path:
    """The record beside a weights file: ``models/model.pt`` -> ``models/model.json``."""
    return Path(weights).with_suffix(RECORD_SUFFIX)


def read_record(weights: str | os.PathLike) -> dict:
    """The network keys a weights file was trained with (``{}`` when it has no record).

    Args:
        weights: the weights file (``model.pt``); its record is :func:`record_path`.

    Raises:
        ValueError: the record is not a JSON object (one line naming the file).
    """
    path = record_path(weights)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not a JSON record of network keys ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a JSON record of network keys (a {type(record).__name__})")
    return record


def new_model(dataset_fingerprint: str | os.PathLike) -> bool:
    """Whether a training run starts a new model (a train config's ``new_model`` key): it does
    when it trains from a prepared dataset (``stmt-prepare-data``, whose ``fingerprint.json`` is
    ``dataset_fingerprint``); without one it is MONAI Label's bundle training on its datastore,
    which continues the weights it serves (its ``pretrained`` loads them into the network of
    their record, :func:`recorded`). ``--new_model True|False`` decides it on the command line.
    """
    return Path(dataset_fingerprint).is_file()


def recorded(weights: str | os.PathLike, key: str, default, new_model: bool = False):
    """A network or input-size key of the weights at ``weights``: the value of their record
    (:func:`read_record`, ``model.pt`` -> ``model.json``), else ``default`` (the config's).

    The bundles' configs write their network keys as
    ``"$stmt_monai.bundle.recorded(@model_path, 'spatial_size', [192, 192, 192], @new_model)"``,
    so that a tool reading ``inference.json`` or ``train.json`` alone (MONAI Label's stock bundle
    tasks, the model zoo's checks) builds the network the weights were trained with. A
    ``--key value`` on the command line replaces the expression altogether.

    Args:
        weights: the weights file (``models/model.pt``; missing is fine).
        key: the config id (``spatial_size``, ``base_channels``, ``num_downsamplings``,
            ``max_channels``).
        default: the config's value, the paper's.
        new_model: a training run that starts a new model (:func:`new_model`) builds the
            config's network, not that of the weights it will replace.
    """
    if new_model:
        return default
    return read_record(weights).get(key, default)


def write_record(weights: str | os.PathLike, record: Mapping[str, object]) -> Path:
    """Write the record of a weights file atomically (:func:`record_path`).

    Args:
        weights: the weights file the record describes.
        record: config ids and the values the network was built with, e.g.
            ``{"spatial_size": [48, 48, 48], "base_channels": 8, "num_downsamplings": 3}``;
            values must be JSON (lists, numbers, strings).
    """
    from stmt_monai.io import write_text_atomic

    plain = {str(k): _plain(v) for k, v in record.items()}
    return write_text_atomic(record_path(weights), json.dumps(plain, indent=4) + "\n")


def _plain(value):
    """A config value as JSON: tuples and tensors -> lists, numpy / torch scalars -> numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def configs_dir(bundle_root: str | os.PathLike) -> Path:
    return Path(bundle_root).resolve() / "configs"


def workflows(bundle_root: str | os.PathLike) -> list[str]:
    """The workflows a bundle has (its config names less metadata, demo and multi-GPU layers)."""
    names = (p.stem for p in configs_dir(bundle_root).glob("*.json"))
    return sorted(n for n in names if n not in NOT_WORKFLOWS and not n.startswith(MULTI_GPU_PREFIX))


def config_files(bundle_root: str | os.PathLike, workflow: str = "inference", demo: bool = False, multi_gpu: bool = False) -> list[Path]:
    """The config files, in layering order, of a bundle's workflow.

    The model zoo's layering: ``inference.json``, ``train.json`` (and the organ bundle's
    ``train_teacher.json``, ``pseudo_label.json``) stand alone, which is how MONAI Label's stock
    bundle tasks and the zoo's checks read them; ``evaluate.json`` goes over ``train.json``
    (:data:`LAYERED_OVER`); ``multi_gpu_<workflow>.json`` over the workflow for ``torchrun``.

    Args:
        bundle_root: the bundle folder.
        workflow: the workflow's config name (``train``, ``inference``, ``evaluate``,
            ``train_teacher``, ``pseudo_label``).
        demo: layer ``configs/demo.json`` last (the shipped demo weights' reduced network).
        multi_gpu: layer ``configs/multi_gpu_<workflow>.json`` on top (``torchrun``).

    Raises:
        FileNotFoundError: the bundle has no such workflow (the message lists those it has).
    """
    configs = configs_dir(bundle_root)
    own = configs / f"{workflow}.json"
    if not own.is_file():
        raise FileNotFoundError(f"{own}: bundle {Path(bundle_root).name} has no workflow {workflow!r} (it has: {', '.join(workflows(bundle_root))})")
    files = [own]
    if workflow in LAYERED_OVER:
        files = config_files(bundle_root, LAYERED_OVER[workflow]) + files
    if multi_gpu:
        extra = configs / f"{MULTI_GPU_PREFIX}{workflow}.json"
        if not extra.is_file():
            raise FileNotFoundError(f"{extra}: bundle {Path(bundle_root).name} has no multi-GPU variant of {workflow!r}")
        files.append(extra)
    if demo:
        files.append(configs / DEMO_CONFIG)
    return files


def format_override(value) -> str:
    """A ``--key value`` value that ``monai.bundle run`` (python-fire) parses back to ``value``."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_override(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return repr(dict(value))
    return str(value)


def override_args(overrides: Mapping[str, object] | None) -> list[str]:
    """``{"max_epochs": 2, "spatial_size": [48, 48, 48]}`` -> ``["--max_epochs", "2", "--spatial_size", "[48,48,48]"]``."""
    args: list[str] = []
    for key, value in (overrides or {}).items():
        args += [f"--{key}", format_override(value)]
    return args


def bundle_command(
    bundle_root: str | os.PathLike,
    workflow: str,
    overrides: Mapping[str, object] | None = None,
    demo: bool = False,
    nproc: int | None = None,
    python: str | None = None,
    args_file: str | os.PathLike | None = None,
) -> list[str]:
    """The command line that runs a bundle workflow.

    ``python -m monai.bundle run --bundle_root B --config_file [...] --meta_file ... --logging_file
    ... --key value ...``; with ``nproc`` > 1, ``torchrun --nproc_per_node N -m monai.bundle run``
    with the workflow's ``multi_gpu_*.json`` layered on top.

    Args:
        bundle_root: the bundle folder.
        workflow: config name (see :func:`config_files`).
        overrides: ``--key value`` overrides of config ids (``{"max_epochs": 100}``); a
            ``bundle_root`` among them is the folder the run writes into (its ``models/``,
            ``logs/``), the configs still coming from ``bundle_root``.
        demo: layer the demo weights' ``demo.json``.
        nproc: processes (GPUs) for ``torchrun``; ``None`` or 1 for one process.
        python: the interpreter (default: this one; ``torchrun`` is taken from beside it).
        args_file: ``--args_file``: a JSON of overrides applied before ``overrides`` (the
            record of the weights an inference or evaluation loads, :func:`record_path`).
    """
    python = python or sys.executable
    multi = bool(nproc and int(nproc) > 1)
    overrides = dict(overrides or {})
    # a bundle_root override: the folder the workflow resolves its paths from and writes into
    # (models/, logs/), while its configs are still read from ``bundle_root``
    root = overrides.pop("bundle_root", bundle_root)
    files = config_files(bundle_root, workflow, demo=demo, multi_gpu=multi)
    configs = configs_dir(bundle_root)
    head = [str(Path(python).parent / "torchrun"), "--nproc_per_node", str(int(nproc)), "-m"] if multi else [python, "-m"]
    return [
        *head,
        "monai.bundle",
        "run",
        "--bundle_root",
        str(Path(root).resolve()),
        "--config_file",
        "[" + ",".join(f"'{f}'" for f in files) + "]",
        "--meta_file",
        str(configs / METADATA),
        "--logging_file",
        str(configs / LOGGING),
        *(["--args_file", str(Path(args_file).resolve())] if args_file else []),
        *override_args(overrides),
    ]


def epoch_seconds(log: str, engine: str = "Trainer") -> list[float]:
    """Seconds of each epoch of an ignite engine, from a workflow's log lines
    ``<...engine> - INFO - Epoch[k] Complete. Time taken: HH:MM:SS.fff``.

    Args:
        log: the workflow's output (:func:`run_workflow`'s ``log_file``).
        engine: the end of the engine's class name: ``Trainer`` (any trainer),
            ``SelfTrainingTrainer``, ``MeanTeacherTrainer``, ``Evaluator``.
    """
    pattern = rf"\w*{re.escape(engine)} - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)"
    return [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in re.findall(pattern, log)]


class WorkflowFailed(RuntimeError):
    """A bundle workflow exited with an error; ``str()`` names the workflow, the log and its tail."""


def run_workflow(
    bundle_root: str | os.PathLike,
    workflow: str,
    overrides: Mapping[str, object] | None = None,
    log_file: str | os.PathLike | None = None,
    demo: bool = False,
    nproc: int | None = None,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    threads: int | None = None,
    timeout: float | None = None,
    args_file: str | os.PathLike | None = None,
    echo: bool = False,
) -> float:
    """Run a bundle workflow in a new process (:func:`bundle_command`); its wall time in s.

    Args:
        bundle_root, workflow, overrides, demo, nproc, args_file: see :func:`bundle_command`.
        log_file: where the workflow's stdout and stderr go (appended); default: inherited.
        cwd: working directory (relative paths in the overrides resolve from it).
        env: environment (default this process's).
        threads: ``OMP_NUM_THREADS`` of the process (torch's CPU threads).
        timeout: seconds before the process is killed.
        echo: with ``log_file``, also copy each line of the output to this process's stdout
            (the workflow's progress lines reach the terminal and the log alike).

    Raises:
        WorkflowFailed: non-zero exit, with the last lines of its log.
    """
    command = bundle_command(bundle_root, workflow, overrides, demo=demo, nproc=nproc, args_file=args_file)
    environment = dict(os.environ if env is None else env)
    if threads:
        environment["OMP_NUM_THREADS"] = str(int(threads))
    start = time.perf_counter()
    if log_file is None:
        proc = subprocess.run(command, cwd=cwd, env=environment, timeout=timeout)
        tail = ""
    else:
        log = Path(log_file)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            if echo:
                proc = _run_echoed(command, out, cwd=cwd, env=environment, timeout=timeout)
            else:
                proc = subprocess.run(command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    seconds = time.perf_counter() - start
    if proc.returncode:
        where = f" (log: {log_file})" if log_file else ""
        raise WorkflowFailed(f"{Path(bundle_root).name} {workflow} exited with status {proc.returncode} after {seconds:.0f} s{where}\n{tail}")
    return seconds


def _run_echoed(command: Sequence[str], out, cwd=None, env=None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` with its stdout and stderr written line by line to ``out`` and to stdout."""
    import threading

    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def copy() -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            out.write(line)
            out.flush()
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join()
    return subprocess.CompletedProcess(command, proc.returncode)


def workflow_parser(
    bundle_root: str | os.PathLike, workflow: str = "inference", overrides: Mapping[str, object] | None = None, demo: bool = False
):
    """The :class:`monai.bundle.ConfigParser` of a bundle workflow, in this process, with
    ``bundle_root`` absolute and ``overrides`` applied (ids such as ``"spatial_size"`` or
    ``"train#trainer#max_epochs"``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files(bundle_root, workflow, demo=demo)])
    parser["bundle_root"] = str(Path(bundle_root).resolve())
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser

