"""Running a bundle's workflow: which config files make it up, and the one command that runs it.

Every place that runs a bundle workflow (``stmt-train``, the ablation, ``scripts/train_demo.py``,
the export, the tests) goes through :func:`config_files` (the layering rule) and
:func:`bundle_command` / :func:`run_workflow` (``python -m monai.bundle run``, or ``torchrun``
for several processes), so that a user's command line and the project's own runs are the same.

Overrides are ``--key value`` pairs as ``monai.bundle run`` takes them (python-fire parses the
value): :func:`override_args` writes lists, tuples and booleans so that they parse back to the
same Python value.
"""

from __future__ import annotations

import os
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


def configs_dir(bundle_root: str | os.PathLike) -> Path:
    return Path(bundle_root).resolve() / "configs"


def config_files(bundle_root: str | os.PathLike, workflow: str = "inference", demo: bool = False, multi_gpu: bool = False) -> list[Path]:
    """The config files, in layering order, of a bundle's workflow.

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
        have = sorted(p.stem for p in configs.glob("*.json") if p.stem not in ("metadata", "common", "demo") and not p.stem.startswith(MULTI_GPU_PREFIX))
        raise FileNotFoundError(f"{own}: bundle {Path(bundle_root).name} has no workflow {workflow!r} (it has: {', '.join(have)})")
    files = [configs / "common.json"] if (configs / "common.json").is_file() else []
    files.append(own)
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
) -> list[str]:
    """The command line that runs a bundle workflow.

    ``python -m monai.bundle run --bundle_root B --config_file [...] --meta_file ... --logging_file
    ... --key value ...``; with ``nproc`` > 1, ``torchrun --nproc_per_node N -m monai.bundle run``
    with the workflow's ``multi_gpu_*.json`` layered on top.

    Args:
        bundle_root: the bundle folder.
        workflow: config name (see :func:`config_files`).
        overrides: ``--key value`` overrides of config ids (``{"max_epochs": 100}``).
        demo: layer the demo weights' ``demo.json``.
        nproc: processes (GPUs) for ``torchrun``; ``None`` or 1 for one process.
        python: the interpreter (default: this one; ``torchrun`` is taken from beside it).
    """
    python = python or sys.executable
    multi = bool(nproc and int(nproc) > 1)
    files = config_files(bundle_root, workflow, demo=demo, multi_gpu=multi)
    configs = configs_dir(bundle_root)
    head = [str(Path(python).parent / "torchrun"), "--nproc_per_node", str(int(nproc)), "-m"] if multi else [python, "-m"]
    return [
        *head,
        "monai.bundle",
        "run",
        "--bundle_root",
        str(Path(bundle_root).resolve()),
        "--config_file",
        "[" + ",".join(f"'{f}'" for f in files) + "]",
        "--meta_file",
        str(configs / METADATA),
        "--logging_file",
        str(configs / LOGGING),
        *override_args(overrides),
    ]


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
) -> float:
    """Run a bundle workflow in a new process (:func:`bundle_command`); its wall time in s.

    Args:
        bundle_root, workflow, overrides, demo, nproc: see :func:`bundle_command`.
        log_file: where the workflow's stdout and stderr go (appended); default: inherited.
        cwd: working directory (relative paths in the overrides resolve from it).
        env: environment (default this process's).
        threads: ``OMP_NUM_THREADS`` of the process (torch's CPU threads).
        timeout: seconds before the process is killed.

    Raises:
        WorkflowFailed: non-zero exit, with the last lines of its log.
    """
    command = bundle_command(bundle_root, workflow, overrides, demo=demo, nproc=nproc)
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
            proc = subprocess.run(command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    seconds = time.perf_counter() - start
    if proc.returncode:
        where = f" (log: {log_file})" if log_file else ""
        raise WorkflowFailed(f"{Path(bundle_root).name} {workflow} exited with status {proc.returncode} after {seconds:.0f} s{where}\n{tail}")
    return seconds


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

