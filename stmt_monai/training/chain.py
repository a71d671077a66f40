"""The whole StMt training chain as one resumable command (``stmt-train``).

    stmt-train --data_root /data/FLARE23 --work_dir runs/flare23
    stmt-train --data_root cohort/ --work_dir runs/small --spatial_size [48,48,48] --base_channels 8 \\
        --num_downsamplings 3 --max_epochs 50 --teacher_max_epochs 50
    stmt-segment CT.nii.gz out/ --weights trained --bundles_dir runs/small/bundles

The paper's order (section 2, Fig. 2a), each step its bundle's own workflow run by
:func:`stmt_monai.bundle.run_workflow` (``python -m monai.bundle run``, ``torchrun`` with
``--nproc`` > 1), exactly as the bundles' docs/README.md commands run it:

============== ===================== =================================================================
step           bundle, workflow      what
============== ===================== =================================================================
triage         (in process)          :func:`stmt_monai.data.triage.triage_dataset`: categories, datalists, fingerprint
teacher        organ_selftrain,      the organ teacher on the fully organ labelled cases
               ``train_teacher``
pseudo_labels  organ_selftrain,      corrected (CPL) and plain (PL) pseudo labels of the other cases
               ``pseudo_label``
stage1         coarse_abdomen,       stage 1: the binary abdomen, labelled + CPL + PL
               ``train``
organ_student  organ_selftrain,      the organ student, three streams
               ``train``
tumor          tumor_meanteacher,    the tumor mean teacher (regions of interest from the pseudo labels)
               ``train``
============== ===================== =================================================================

Where things go (``work_dir``): ``prepared/`` (datalists, fingerprint), ``pseudo_labels/``,
``bundles/`` (a working copy of the four bundles, configs and docs without weights: each
training writes its weights into its copy's ``models/``, never into the shipped
``models/demo/``), ``logs/<step>.log`` (each step's whole output; it is also echoed to the
terminal), ``chain/<step>.json`` (each step's state), ``summary.json``. ``stmt-segment
--weights trained --bundles_dir <work_dir>/bundles`` then runs the cascade on them, and each
copied bundle's own inference workflow loads them (``--args_file models/model.json``).

Overrides (``--key value``, any bundle config id) go to every bundle step; ``--<step>.<key>
value`` to one step only (``--stage1.spatial_size [64,64,64]``). Resuming: a step whose state
says done with the same settings (its overrides, less ``device`` and ``num_workers``) and the
same inputs (the steps it reads finished at the same time) is skipped; an interrupted step runs
again and its bundle resumes (the trainers from ``checkpoint_last.pt``, pseudo labelling from the
cases already written); a step whose settings or inputs changed starts afresh (its resume
checkpoint is removed, its pseudo labels are redone) and so do the steps that read it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from stmt_monai.bundle import record_path, run_workflow, workflow_parser
from stmt_monai.io import write_text_atomic

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the chain.

    Attributes:
        name: the step's name (``--<name>.<key>`` overrides, ``logs/<name>.log``).
        bundle: the bundle folder name (``None``: the triage, run in this process).
        workflow: the bundle workflow (``configs/<workflow>.json``).
        what: the paper's words for it.
        reads: the steps whose outputs it reads.
        weights_id: config id of the weights it writes (``None``: none).
    """

    name: str
    bundle: str | None
    workflow: str | None
    what: str
    reads: tuple[str, ...] = ()
    weights_id: str | None = None

    @property
    def trains(self) -> bool:
        return self.weights_id is not None


#: the chain, in the paper's order
STEPS: tuple[Step, ...] = (
    Step("triage", None, None, "data categories, datalists, fingerprint"),
    Step("teacher", "organ_selftrain", "train_teacher", "organ teacher", ("triage",), "teacher_path"),
    Step("pseudo_labels", "organ_selftrain", "pseudo_label", "pseudo labels (CPL, PL)", ("triage", "teacher")),
    Step("stage1", "coarse_abdomen", "train", "stage 1: coarse abdomen", ("triage", "pseudo_labels"), "model_path"),
    Step("organ_student", "organ_selftrain", "train", "organ student", ("triage", "pseudo_labels"), "model_path"),
    Step("tumor", "tumor_meanteacher", "train", "tumor mean teacher", ("triage", "pseudo_labels"), "model_path"),
)
STEP_NAMES = tuple(step.name for step in STEPS)

#: the bundles a working copy holds (the cascade's too, so its own workflow runs there)
BUNDLES = ("coarse_abdomen", "organ_selftrain", "tumor_meanteacher", "cascade")

#: overrides that change where or how fast a step runs, not what it makes
RUNTIME_KEYS = frozenset({"device", "num_workers"})


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="microseconds")


def _plain(value):
    """Overrides as JSON (paths as strings), for comparing settings between runs."""
    return json.loads(json.dumps(value, default=str))


def copy_bundles(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A working copy of the bundles: configs, docs and metadata, no weights nor logs.

    A bundle already in ``dest`` is kept as it is (it holds a run's weights and maybe the
    user's edits). From ``models/`` only ``large_files.yml`` is copied: the shipped demo weights
    stay where they are, and ``--weights auto`` in the copy means the trained weights.

    Returns:
        ``dest``.
    """
    source, dest = Path(source).resolve(), Path(dest).resolve()

    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder).name == "models":
            return [n for n in names if n != "large_files.yml"]
        return [n for n in names if n in ("logs", "eval", "__pycache__")]

    for name in BUNDLES:
        if not (dest / name / "configs").is_dir():
            if not (source / name / "configs").is_dir():
                raise FileNotFoundError(f"{source / name}: no such bundle to copy (--source_bundles names the repository's bundles/)")
            shutil.copytree(source / name, dest / name, ignore=ignore, dirs_exist_ok=True)
    return dest


def best_metric(log: str | os.PathLike, weights: str | os.PathLike) -> float | None:
    """The validation value of the weights a training kept: the last ``<metric> improved to
    <value>: saved <weights>`` line of :class:`stmt_monai.training.handlers.BestCheckpoint` in
    the step's log (appended to across resumed runs; the best only rises); ``None`` if none."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(rf"improved to ([-0-9.eE+]+): saved {re.escape(str(weights))}\s*$", text, re.M)
    return float(found[-1]) if found else None


class Chain:
    """The training chain over one work folder (see the module's docstring).

    Args:
        data_root: FLARE23-layout folder or datalist JSON (:func:`stmt_monai.data.triage.triage_dataset`).
        work_dir: everything the chain writes.
        bundles_dir: where the bundles are trained (default ``<work_dir>/bundles``, a copy of
            ``source_bundles``); the repository's ``bundles/`` trains in place.
        source_bundles: the bundles to copy (default the repository's, :func:`default_bundles_dir`).
        overrides: ``{config id: value}`` for every bundle step, ``{"<step>.<id>": value}`` for one.
        nproc: processes (GPUs) of each training step (``torchrun``); pseudo labelling runs in one.
        threads: ``OMP_NUM_THREADS`` of each step (default: inherited).
        validation_share: the triage's held-out share (without a validation folder).
        echo: copy each step's output to the terminal (it always goes to ``logs/<step>.log``).
    """

    def __init__(
        self,
        data_root: str | os.PathLike,
        work_dir: str | os.PathLike,
        bundles_dir: str | os.PathLike | None = None,
        source_bundles: str | os.PathLike | None = None,
        overrides: Mapping[str, object] | None = None,
        nproc: int = 1,
        threads: int | None = None,
        validation_share: float = 0.2,
        echo: bool = True,
    ):
        from stmt_monai.inference.bundles import default_bundles_dir

        self.data_root = Path(data_root).resolve()
        self.work = Path(work_dir).resolve()
        self.bundles = Path(bundles_dir).resolve() if bundles_dir else self.work / "bundles"
        self.source = Path(source_bundles).resolve() if source_bundles else default_bundles_dir()
        self.prepared, self.pseudo = self.work / "prepared", self.work / "pseudo_labels"
        self.logs, self.state_dir = self.work / "logs", self.work / "chain"
        self.nproc, self.threads = int(nproc or 1), threads
        self.validation_share = float(validation_share)
        self.echo = bool(echo)
        self.shared, self.per_step = {}, {name: {} for name in STEP_NAMES}
        for key, value in (overrides or {}).items():
            step, dot, rest = str(key).partition(".")
            if dot and step in self.per_step:
                self.per_step[step][rest] = value
            elif dot:
                raise ValueError(f"--{key}: no step {step!r} (steps: {', '.join(STEP_NAMES)})")
            else:
                self.shared[str(key)] = value

    # ------------------------------------------------------------------ what each step gets
    def overrides(self, step: Step) -> dict:
        """The ``--key value`` overrides of a bundle step: the chain's folders, the shared
        overrides, the step's own."""
        where = {"prepared_dir": str(self.prepared)}
        if step.bundle == "organ_selftrain":
            where["pseudo_label_dir"] = str(self.pseudo)
        if step.bundle == "coarse_abdomen":
            where["pseudo_datalist"] = str(self.pseudo / "datalist_pseudo_labelled.json")
        if step.bundle == "tumor_meanteacher":
            # FLARE23's tumor cases often have no organ label: their box comes from the pseudo labels
            where["roi_dir"] = str(self.pseudo)
        overrides = {**where, **self.shared, **self.per_step[step.name]}
        if self.nproc > 1 and step.trains:
            overrides.pop("device", None)  # torchrun's multi_gpu_*.json gives each rank its device
        return overrides

    def settings(self, step: Step) -> dict:
        """What a step's result depends on (compared with the last run's to skip it)."""
        if step.bundle is None:
            return {"data_root": str(self.data_root), "validation_share": self.validation_share}
        return _plain({k: v for k, v in self.overrides(step).items() if k not in RUNTIME_KEYS})

    def bundle_root(self, step: Step) -> Path:
        return self.bundles / step.bundle

    def weights(self, step: Step) -> Path | None:
        """Where the step's weights are (its bundle's ``teacher_path`` / ``model_path``)."""
        if not step.trains:
            return None
        from stmt_monai.inference.bundles import weights_path

        parser = workflow_parser(self.bundle_root(step), step.workflow, self.overrides(step))
        if step.weights_id in parser:
            return Path(parser.get_parsed_content(step.weights_id))
        return weights_path(parser)

    def resume_checkpoint(self, step: Step) -> Path | None:
        """The training state the step's bundle resumes from (``train#checkpoint``)."""
        if not step.trains:
            return None
        parser = workflow_parser(self.bundle_root(step), step.workflow, self.overrides(step))
        return Path(parser.get_parsed_content("train#checkpoint#save_dir")) / parser.get("train#checkpoint#filename", "checkpoint_last.pt")

    def check_overrides(self) -> None:
        """Refuse an override that no step's config defines (a typo would otherwise be ignored).

        Raises:
            ValueError: one line naming the unknown ``--key`` options.
        """
        known: dict[str, set] = {}
        for step in STEPS:
            if step.bundle is not None:
                parser = workflow_parser(self.bundle_root(step), step.workflow)
                known[step.name] = {key for key in {*self.shared, *self.per_step[step.name]} if key in parser}
        unknown = [f"--{key}" for key in self.shared if not any(key in ids for ids in known.values())]
        unknown += [f"--{step}.{key}" for step, keys in self.per_step.items() for key in keys if key not in known.get(step, ())]
        if unknown:
            raise ValueError(f"{' '.join(unknown)}: no such config id in the bundles' workflows (a typo?); see each bundle's docs/README.md")

    # ------------------------------------------------------------------ state
    def state_file(self, step: Step) -> Path:
        return self.state_dir / f"{step.name}.json"

    def state(self, step: Step) -> dict:
        try:
            return json.loads(self.state_file(step).read_text())
        except (OSError, ValueError):
            return {}

    def inputs(self, step: Step) -> dict:
        """When each step this one reads last finished."""
        return {name: self.state(self.step(name)).get("finished") for name in step.reads}

    @staticmethod
    def step(name: str) -> Step:
        for step in STEPS:
            if step.name == name:
                return step
        raise ValueError(f"no step {name!r} (steps: {', '.join(STEP_NAMES)})")

    def write_state(self, step: Step, **state) -> None:
        write_text_atomic(self.state_file(step), json.dumps(state, indent=1) + "\n")

    def say(self, message: str) -> None:
        line = f"stmt-train: {message}"
        print(line, flush=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / "chain.log").open("a") as out:
            out.write(f"{_now()} {line}\n")

    # ------------------------------------------------------------------ running
    def run(self, until: str | None = None) -> list[dict]:
        """Run (or skip, or resume) every step in order, up to and including ``until``; print
        and return the summary rows."""
        if until is not None:
            self.step(until)
        if not self.data_root.exists():
            raise FileNotFoundError(f"{self.data_root}: no such data folder or datalist (--data_root)")
        self.work.mkdir(parents=True, exist_ok=True)
        if self.bundles != self.source:
            copy_bundles(self.source, self.bundles)
        self.check_overrides()
        self.say(f"work folder {self.work}; bundles {self.bundles}; logs {self.logs}")
        rows = []
        for step in STEPS:
            try:
                rows.append(self.run_step(step))
            except BaseException:
                rows.append({"step": step.name, "what": step.what, "status": "FAILED or interrupted", "seconds": None})
                self.write_summary(rows)
                raise
            if step.name == until:
                break
        self.write_summary(rows)
        return rows

    def run_step(self, step: Step) -> dict:
        settings, inputs, state = self.settings(step), self.inputs(step), self.state(step)
        same = state.get("settings") == settings and state.get("inputs") == inputs
        if same and state.get("status") == "done":
            self.say(f"{step.name}: done before ({state.get('seconds', 0):.0f} s), skipped")
            return self.row(step, "skipped (done)", state.get("seconds"))
        fresh = bool(state) and not same
        resumed = same and state.get("status") == "running"
        if fresh:
            self.say(f"{step.name}: settings or inputs changed since its last run: starting it afresh")
            self.start_afresh(step)
        self.write_state(step, status="running", settings=settings, inputs=inputs, started=_now())
        log = self.logs / f"{step.name}.log"
        self.say(f"{step.name}: {step.what}{' (resuming)' if resumed else ''} ... (log: {log})")
        start = time.perf_counter()
        if step.bundle is None:
            self.triage(log)
        else:
            overrides = self.overrides(step)
            if step.name == "pseudo_labels" and fresh:
                overrides["overwrite"] = True  # a new teacher: predict every case again
            run_workflow(
                self.bundle_root(step), step.workflow, overrides, log_file=log, nproc=self.nproc if step.trains else None,
                threads=self.threads, echo=self.echo,
            )
        seconds = time.perf_counter() - start
        self.write_state(step, status="done", settings=settings, inputs=inputs, seconds=round(seconds, 1), finished=_now())
        self.say(f"{step.name}: done in {seconds:.0f} s")
        return self.row(step, "resumed" if resumed else "ran", seconds)

    def start_afresh(self, step: Step) -> None:
        """Remove what would make a changed step resume its old run (its training state)."""
        checkpoint = self.resume_checkpoint(step)
        if checkpoint is not None and checkpoint.is_file():
            checkpoint.unlink()
            self.say(f"{step.name}: removed {checkpoint}")

    def triage(self, log: Path) -> None:
        from stmt_monai.data.triage import triage_dataset

        result = triage_dataset(self.data_root, self.prepared, validation_share=self.validation_share, progress=False)
        text = result.table() + "".join(f"\nskipped: {f['error']}" for f in result.failed)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text + "\n")
        print(text, flush=True)
        if not result.cases:
            raise ValueError(f"{self.data_root}: no training case could be read (see {log})")

    # ------------------------------------------------------------------ summary
    def row(self, step: Step, status: str, seconds: float | None) -> dict:
        row = {"step": step.name, "what": step.what, "status": status, "seconds": None if seconds is None else round(seconds, 1)}
        if step.trains:
            row["weights"] = str(self.weights(step))
            row["record"] = str(record_path(row["weights"]))
            row["best_val_dice"] = best_metric(self.logs / f"{step.name}.log", row["weights"])
        elif step.name == "pseudo_labels":
            row["output"] = str(self.pseudo)
            row["pseudo_labels"] = pseudo_label_counts(self.pseudo / "datalist_pseudo_labelled.json")
        else:
            row["output"] = str(self.prepared)
        return row

    def write_summary(self, rows: Sequence[dict]) -> None:
        table = summary_table(rows)
        print(table, flush=True)
        with (self.logs / "chain.log").open("a") as out:
            out.write(table + "\n")
        summary = {"work_dir": str(self.work), "bundles_dir": str(self.bundles), "steps": list(rows)}
        write_text_atomic(self.work / "summary.json", json.dumps(summary, indent=1) + "\n")
        if rows and rows[-1]["step"] == STEPS[-1].name:
            self.say(f"segment with the trained weights: stmt-segment CT.nii.gz out/ --weights trained --bundles_dir {self.bundles}")


def pseudo_label_counts(datalist: Path) -> str:
    """``"6 CPL + 4 PL"`` from a pseudo-label datalist (``"-"`` if unreadable)."""
    try:
        cases = json.loads(Path(datalist).read_text())["training"]
    except (OSError, ValueError, KeyError):
        return "-"
    streams = [c.get("stream") for c in cases]
    return f"{streams.count('cpl')} CPL + {streams.count('pl')} PL"


def summary_table(rows: Sequence[dict]) -> str:
    """The chain's summary: each step's status, time, best validation Dice and output."""
    header = ("step", "status", "time", "best val Dice", "weights / output")
    lines = []
    for row in rows:
        seconds = row.get("seconds")
        dice = row.get("best_val_dice")
        shown = f"{dice:.4f}" if isinstance(dice, float) else row.get("pseudo_labels", "-")
        lines.append((row["step"], row["status"], "-" if seconds is None else f"{seconds:.0f} s", shown, row.get("weights") or row.get("output", "")))
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join(text.rstrip() for text in [fmt.format(*header), rule, *(fmt.format(*map(str, line)) for line in lines)])


def train_chain(
    data_root: str,
    work_dir: str,
    bundles_dir: str | None = None,
    source_bundles: str | None = None,
    nproc: int = 1,
    threads: int | None = None,
    validation_share: float = 0.2,
    until: str | None = None,
    echo: bool = True,
    **overrides,
) -> list[dict]:
    """Train the whole StMt chain from a FLARE23-style folder, resumably (``stmt-train``).

    Args:
        data_root: FLARE23-layout folder (``imagesTr/``, ``labelsTr/``, ``unlabeled/``, optional
            ``validation/``) or a MONAI datalist JSON.
        work_dir: where everything goes: ``prepared/``, ``pseudo_labels/``, ``bundles/`` (the
            trained bundles: ``stmt-segment --weights trained --bundles_dir <work_dir>/bundles``),
            ``logs/``, ``chain/``, ``summary.json``.
        bundles_dir: train these bundles instead of a copy in ``work_dir`` (e.g. the
            repository's ``bundles/``: weights in each bundle's ``models/``).
        source_bundles: the bundles copied into ``work_dir`` (default the repository's).
        nproc: GPUs (processes) per training step, by ``torchrun``.
        threads: CPU threads of each step (``OMP_NUM_THREADS``).
        validation_share: share of the fully labelled cases held out when there is no
            ``validation/`` folder.
        until: stop after this step (``triage``, ``teacher``, ``pseudo_labels``, ``stage1``,
            ``organ_student``, ``tumor``).
        echo: show each step's output (it always goes to ``logs/<step>.log``).
        overrides: ``--key value`` for every bundle step (``--spatial_size [48,48,48]
            --base_channels 8 --max_epochs 50 --teacher_max_epochs 50 --device cuda``);
            ``--<step>.<key> value`` for one step.

    Returns:
        The summary rows (also in ``<work_dir>/summary.json``).
    """
    chain = Chain(data_root, work_dir, bundles_dir, source_bundles, overrides, nproc, threads, validation_share, echo)
    return chain.run(until)
