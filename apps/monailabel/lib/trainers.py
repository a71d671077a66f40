"""MONAI Label training task over a stage bundle's ``train.json``.

MONAI Label's :class:`BundleTrainTask` runs the bundle's ``run`` with the datastore's labelled
images. What this subclass changes for the stage bundles:

- configs read as the bundles' are (``train.json``, and ``demo.json`` on top when the
  app serves the demo weights, so that training continues the network being served and writes
  the weights file the inference task reads);
- the datastore's cases replace ``train#datalist`` / ``validate#datalist``, where MONAI Label
  replaces ``train#dataset#data`` / ``validate#dataset#data``: the stage bundles' three-stream
  batch sampler reads ``train#datalist`` too; each case is a fully labelled one (stream
  ``labelled``), and its label is a FLARE label map (0..14);
- the intensity fingerprint stays the one beside the weights (``fingerprint`` id), where the
  bundles' ``initialize`` copies the prepared dataset's;
- ``max_epochs`` sets the bundle's top-level key too (the learning-rate schedule follows it), and
  the validation interval is at most ``max_epochs``, so a short run still saves its best weights;
- each request is a new run from the weights being served (``pretrained``; the mean teacher's
  student and EMA teacher both start from them), not the resumption of the bundle's last
  checkpoint;
- with no validation case left by the split (a small datastore), the training cases validate.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import monai.bundle
from monai.bundle import ConfigParser
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask

from stmt_monai.bundle import config_files, read_record
from stmt_monai.inference.bundles import bundle_config, weights_path
from stmt_monai.preprocessing.transforms import STREAM
from stmt_monai.training.losses import LABELLED

logger = logging.getLogger(__name__)


class _StageTrainConstants(BundleConstants):
    def key_train_dataset_data(self) -> str:
        return "train#datalist"

    def key_validate_dataset_data(self) -> str:
        return "validate#datalist"


class StageBundleTrainTask(BundleTrainTask):
    """Train a stage bundle from MONAI Label (``POST /train/<bundle>``).

    Args:
        path: the bundle folder.
        conf: the server's ``--conf`` pairs.
        weights: ``"auto"``, ``"trained"`` or ``"demo"``: which network (and weights file) the app
            serves, hence trains (see :func:`stmt_monai.inference.bundles.bundle_config`).
    """

    def __init__(self, path: str | os.PathLike, conf: dict[str, str], weights: str = "auto"):
        root = Path(path).resolve()
        inference, kind = bundle_config(root, weights)
        self.config_files = [str(f) for f in config_files(root, "train", demo=kind == "demo")]
        self.weights_file = weights_path(inference)
        # the served weights' network (their record, models/model.json): training goes on with it
        self.record = read_record(self.weights_file)
        key = inference.get("inference_network") or "model"
        super().__init__(str(root), conf, const=_StageTrainConstants(), model_dict_key=key, load_strict=True)
        if not self.valid:
            return
        fingerprint = Path(self.bundle_config.get_parsed_content("fingerprint"))
        if not fingerprint.is_file():
            logger.warning("%s: no trainer, its fingerprint %s is missing (train the bundle once)", root.name, fingerprint)
            self.valid = False

    def _load_bundle_config(self, path, config):
        parser = ConfigParser()
        parser.read_config(self.config_files)
        parser["bundle_root"] = str(path)
        for key, value in self.record.items():
            parser[key] = value
        return parser

    def _fetch_datalist(self, request, datastore):
        return [{**item, STREAM: LABELLED} for item in super()._fetch_datalist(request, datastore)]

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle)
        if val is not None and not val:
            logger.info("no validation case after the split: validating on the training cases")
            val = train
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        """Start from the weights being served: a ``CheckpointLoader`` first in ``train#handlers``
        for the network, and for a mean teacher's EMA teacher too (copied from the student before
        the student's weights load). MONAI Label's own version expects every handler to be a
        dict, where the tumor bundle lists its EMA handler as ``"@ema"``."""
        if not pretrained:
            return
        path = model_pytorch if Path(model_pytorch).is_file() else str(self.weights_file)
        if not Path(path).is_file():
            return
        targets = [f"$@{self.const.key_network()}"]
        teacher = self.bundle_config.get("train#trainer#teacher")
        if teacher:
            targets.append(teacher)
        present = [h.get("load_dict") for h in train_handlers if isinstance(h, dict)]
        for position, target in enumerate(targets):
            load_dict = {self.model_dict_key: target}
            if load_dict not in present:
                logger.info("loading %s into %s", path, target)
                loader = {"_target_": "CheckpointLoader", "load_path": path, "load_dict": load_dict, "strict": self.load_strict}
                train_handlers.insert(position, loader)

    def _update_overrides(self, overrides):
        max_epochs = int(overrides[self.const.key_train_trainer_max_epochs()])
        overrides["max_epochs"] = max_epochs
        overrides["dataset_fingerprint"] = "@fingerprint"
        # a request is a new run from the served weights, not the resumption of the last one
        # (whose learning-rate schedule may have ended)
        overrides["train#checkpoint#resume"] = False
        # validate (and so save the best weights) at least once
        overrides["val_interval"] = min(max_epochs, int(self.bundle_config.get("val_interval", 1)))
        return {**self.record, **overrides}

    def run_single_gpu(self, request, overrides):
        monai.bundle.run(
            run_id=request.get("run_id", "run"),
            meta_file=self.bundle_metadata_path,
            config_file=self.config_files,
            logging_file=str(Path(self.bundle_path) / "configs" / "logging.conf"),
            **overrides,
        )
