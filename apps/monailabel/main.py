"""MONAI Label app serving this repository's ``cascade`` bundle (no model-zoo download, no network).

The cascade chains the three stage bundles (coarse abdomen, then the organ and tumor students on
the region of interest): CT in, FLARE label map out (1..13 organs, 14 tumor). MONAI Label's stock
``monaibundle`` sample app cannot chain bundles; it serves and trains each stage bundle itself
(``--conf models coarse_abdomen,organ_selftrain,tumor_meanteacher``; see README.md beside this file).

``--conf`` keys: ``bundles_dir`` (default the repository's ``bundles/``), ``weights`` (``auto``:
trained ``models/model.pt`` where there, else the shipped demo weights; ``trained``; ``demo``),
``preload`` (``true``: load the cascade when the server starts). Weights that are missing leave
the model out of ``/info/`` with a warning; the server still starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lib.infers import CascadeInferTask
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


class StmtApp(MONAILabelApp):
    """The stmt-monai cascade as a MONAI Label model."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundles_dir = Path(conf.get("bundles_dir") or Path(app_dir).resolve().parents[1] / "bundles")
        self.weights = conf.get("weights")  # None: each bundle's default (auto)
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"--conf weights must be one of {WEIGHTS}, got {self.weights!r}")
        models = [n.strip() for n in (conf.get("models") or CASCADE).split(",") if n.strip()]
        stages = [n for n in models if n in STAGE_BUNDLES.values()]
        if stages:
            raise ValueError(
                f"--conf models {','.join(stages)}: serve the stage bundles with MONAI Label's stock monaibundle app "
                "(apps/monailabel/README.md); this app serves the cascade"
            )
        if models not in ([CASCADE], ["all"]):
            raise ValueError(f"--conf models {','.join(models)}: this app serves {CASCADE!r} only")
        logger.info("stmt-monai %s: the cascade over %s (weights %s)", stmt_monai.__version__, self.bundles_dir, self.weights)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="stmt-monai (StMt, FLARE23)",
            description="Abdominal organs and pan-cancer tumor in CT: the StMt cascade",
            version=stmt_monai.__version__,
            labels={name: number for number, name in LABELS.items()},
        )

    def init_infers(self) -> dict[str, InferTask]:
        overrides = {"weights": self.weights} if self.weights else {}
        task = CascadeInferTask(self.bundles_dir / CASCADE, overrides, strtobool(self.conf.get("preload", "false")))
        if not task.is_valid():  # logs why (missing weights, ...)
            logger.warning("--- %s not served", CASCADE)
            return {}
        logger.info("+++ Adding Inferer:: %s => %s", CASCADE, task)
        return {CASCADE: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        # the cascade trains through its stage bundles (their own commands, or the stock app)
        return {}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
