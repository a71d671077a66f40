"""Tiny stage bundles for the cascade's tests: the real stage bundles' configs, a ``demo.json``
with tiny networks, and weights either random (geometry tests) or trained for seconds on the
real CT (placement test).

Training on the real CT is the only option with real anatomy: it is the one real labelled case
(TotalSegmentator's prediction as its mask), so the trained networks are tested on the case
they were fitted to. What that shows is that the cascade puts organs where the CT has them
(any flip, transposition or crop offset between stages would wreck the overlap), not that the
networks generalise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from stmt_monai.inference.bundles import STAGE_BUNDLES, bundle_config, random_weights, save_weights, write_demo_config
from stmt_monai.io import load_image, load_label
from stmt_monai.preprocessing.fingerprint import Fingerprint, foreground_fingerprint
from stmt_monai.preprocessing.stage_input import prepare_volume
from stmt_monai.preprocessing.transforms import target_lookup
from stmt_monai.training.losses import dice_ce_loss

REPO = Path(__file__).resolve().parents[1]
#: tiny networks: 32^3 inputs, 3 down-samplings, 8 base channels capped at 32
TINY = {"base_channels": 8, "num_downsamplings": 3, "network_def#max_channels": 32, "spatial_size": [32, 32, 32]}
FINGERPRINT = Fingerprint(lower=-350.0, upper=80.0, mean=30.0, std=65.0)


def copy_bundles(dest: Path, settings: dict = TINY) -> Path:
    """Copy the three stage bundles' configs to ``dest`` and give each a ``demo.json``."""
    for name in STAGE_BUNDLES.values():
        shutil.copytree(REPO / "bundles" / name / "configs", dest / name / "configs")
        write_demo_config(dest / name, settings)
    return dest


def random_bundles(dest: Path, settings: dict = TINY) -> Path:
    """Tiny bundles with random weights (shape and geometry tests)."""
    copy_bundles(dest, settings)
    for seed, name in enumerate(STAGE_BUNDLES.values()):
        random_weights(dest / name, FINGERPRINT, seed=seed)
    return dest


def _fit(network, x, y, steps: int, lr: float = 3e-3):
    optimizer = torch.optim.Adam(network.parameters(), lr)
    loss = dice_ce_loss()
    network.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32^3 network gains nothing from more, and a busy machine loses much
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            value = loss(network(x), y)
            value.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return network.eval()


def trained_bundles(dest: Path, image_path: Path, label_path: Path, steps=(40, 120), seed: int = 0) -> Path:
    """Tiny bundles whose stage-1 and organ networks are fitted to one labelled CT.

    Stage 1 learns the abdomen (every label > 0) on the whole CT at 32^3; the organ network the
    13 organs on label-box crops (10 mm margin, three crops with +-10 mm jitter, as the organ
    bundle trains) at 32^3; both with the stage's own preprocessing (``prepare_volume`` and the
    fingerprint of this case). The tumor network is left untrained with its output bias set so
    that it predicts no tumor (the real CT has none).
    """
    copy_bundles(dest)
    torch.manual_seed(seed)
    image, affine = load_image(image_path)
    labels, _ = load_label(label_path, image.shape, affine)
    fingerprint = foreground_fingerprint([(image_path, label_path)])
    rng = np.random.default_rng(seed)
    for stage, name in STAGE_BUNDLES.items():
        parser, _ = bundle_config(dest / name, "demo")
        network = parser.get_parsed_content("network_def")
        size = parser.get_parsed_content("spatial_size")
        lut = torch.from_numpy(target_lookup(stage)).long()
        if stage == "abdomen":
            x, y, _ = prepare_volume(image, affine, size, labels=labels)
            xs, ys = fingerprint.normalize(x)[None], lut[y.long()][None]
            network = _fit(network, xs, ys, steps[0])
        elif stage == "organ":
            crops = [prepare_volume(image, affine, size, roi_mask=labels, jitter_mm=jitter, rng=rng, labels=labels) for jitter in (0.0, 10.0, 10.0)]
            xs = torch.stack([fingerprint.normalize(x) for x, _, _ in crops])
            ys = torch.stack([lut[y.long()] for _, y, _ in crops])
            network = _fit(network, xs, ys, steps[1])
        else:
            with torch.no_grad():
                last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
                last.bias.copy_(torch.tensor([10.0, -10.0]))
        path = Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"
        fingerprint.save(parser.get_parsed_content("fingerprint"))
        save_weights(path, network.state_dict(), key=parser.get("inference_network"), half=True)
    return dest
