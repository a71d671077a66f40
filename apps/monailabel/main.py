"""MONAI Label app serving this repository's bundles (no model-zoo download, no network).

Models (``--conf models <names>``, comma separated, default ``all``):

- ``cascade``: the StMt cascade, CT in, FLARE label map out (1..13 organs, 14 tumor);
- ``coarse_abdomen``, ``organ_selftrain``, ``tumor_meanteacher``: each stage bundle for its own
  task, through MONAI Label's bundle inference, and trainable through its bundle trainer.

Other ``--conf`` keys: ``bundles_dir`` (default the repository's ``bundles/``), ``weights``
(``auto``: trained ``models/model.pt`` where there, else the shipped demo weights; ``trained``;
``demo``), ``preload`` (``true``: load the cascade when the server starts), ``skip_trainers``.
See README.md beside this file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lib.infers import CascadeInferTask, StageBundleInferTask
from lib.trainers import StageBundleTrainTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

import stmt_monai
from stmt_monai.inference.bundles import STAGE_BUNDLES, WEIGHTS
from stmt_monai.labels import LABELS

logger = logging.getLogger(__name__)

CASCADE = "cascade"
#: every model this app can serve: the cascade, then the stage bundles in cascade order
MODELS = (CASCADE, *STAGE_BUNDLES.values())


def selected_models(value: str | None) -> list[str]:
    """``--conf models`` as a list of names of :data:`MODELS` (``all`` or empty: every one)."""
    names = [n.strip() for n in (value or "all").split(",") if n.strip()]
    if names == ["all"]:
        return list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)} or all")
    return names


class StmtApp(MONAILabelApp):
    """The stmt-monai bundles as MONAI Label models."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundles_dir = Path(conf.get("bundles_dir") or Path(app_dir).resolve().parents[1] / "bundles")
        self.weights = conf.get("weights")  # None: each bundle's default (auto)
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"--conf weights must be one of {WEIGHTS}, got {self.weights!r}")
        self.models = selected_models(conf.get("models"))
        logger.info("stmt-monai %s: models %s from %s (weights %s)", stmt_monai.__version__, self.models, self.bundles_dir, self.weights)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="stmt-monai (StMt, FLARE23)",
            description="Abdominal organs and pan-cancer tumor in CT: the StMt cascade and its stage bundles",
            version=stmt_monai.__version__,
            labels={name: number for number, name in LABELS.items()},
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name in self.models:
            if name == CASCADE:
                overrides = {"weights": self.weights} if self.weights else {}
                preload = strtobool(self.conf.get("preload", "false"))
                task = CascadeInferTask(self.bundles_dir / name, overrides, preload)
            else:
                task = StageBundleInferTask(self.bundles_dir / name, self.conf, self.weights or "auto")
            if task.is_valid():
                logger.info("+++ Adding Inferer:: %s => %s", name, task)
                infers[name] = task
            else:
                logger.warning("--- %s not served (see the warning above)", name)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name in self.models:
            if name == CASCADE:  # inference only: its stages train through their own bundles
                continue
            task = StageBundleTrainTask(self.bundles_dir / name, self.conf, self.weights or "auto")
            if task.is_valid():
                logger.info("+++ Adding Trainer:: %s => %s", name, task)
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
