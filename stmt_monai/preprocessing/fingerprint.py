"""The dataset's intensity fingerprint and the normalisation it defines (paper section 2.1).

"The 0.5 and 99.5 percentiles of the foreground voxels for clipping as well as the global
foreground mean and s.d. for the normalization" (nnU-Net's CT scheme).
:func:`foreground_fingerprint` computes the four numbers once over the labelled training cases
(at most :data:`FINGERPRINT_SAMPLES_PER_CASE` voxels with label > 0 per case, pooled);
:class:`Fingerprint` stores them (``fingerprint.json``, copied into each bundle's ``models/``
when training starts, so inference uses exactly the training values) and applies them
(:meth:`Fingerprint.normalize`: HU in, clipped and z-scored intensities out).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stmt_monai.arrays import is_tensor
from stmt_monai.io import ImageError, load_image, load_label, write_text_atomic

if TYPE_CHECKING:  # annotations only: the CPU path never imports torch (stmt_monai.arrays)
    import torch

#: nnU-Net's CT normalisation: clip percentiles of foreground voxels
CLIP_PERCENTILES = (0.5, 99.5)


#: voxels sampled per labelled case for the fingerprint (nnU-Net samples 10,000 per case too)
FINGERPRINT_SAMPLES_PER_CASE = 10_000


# ----------------------------------------------------------------------------- fingerprint
@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Foreground intensity statistics of a training set (HU).

    Attributes:
        lower, upper: 0.5 and 99.5 percentiles of foreground voxels (clip range).
        mean, std: global mean and sd of the foreground voxels (z-score).
        num_cases, num_voxels: how many cases and sampled voxels they come from.
    """

    lower: float
    upper: float
    mean: float
    std: float
    num_cases: int = 0
    num_voxels: int = 0

    def normalize(self, image: np.ndarray | torch.Tensor):
        """Clip to ``[lower, upper]`` and z-score: HU in, normalised intensities out."""
        if is_tensor(image):
            return (image.clamp(self.lower, self.upper) - self.mean) / self.std
        return (np.clip(image, self.lower, self.upper) - self.mean) / self.std

    def scale_intensity_range(self) -> dict[str, float]:
        """The same clip + z-score as arguments of MONAI ``ScaleIntensityRange(clip=True)``."""
        return {
            "a_min": self.lower,
            "a_max": self.upper,
            "b_min": (self.lower - self.mean) / self.std,
            "b_max": (self.upper - self.mean) / self.std,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (atomically)."""
        return write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Fingerprint":
        """Read a fingerprint JSON; a missing or malformed file is an :class:`ImageError`."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except FileNotFoundError:
            raise ImageError(path, "fingerprint file not found (run stmt-prepare-data first)") from None
        except (ValueError, TypeError, KeyError) as err:
            raise ImageError(path, f"not a fingerprint JSON ({err})") from None


def foreground_fingerprint(
    cases: Iterable[tuple[str | os.PathLike, str | os.PathLike]],
    samples_per_case: int = FINGERPRINT_SAMPLES_PER_CASE,
    seed: int = 0,
) -> Fingerprint:
    """Compute the intensity fingerprint over labelled cases, one case in memory at a time.

    From each case, up to ``samples_per_case`` foreground voxels (label > 0) are drawn
    uniformly without replacement (seeded by ``seed`` and the case's position), and the
    percentiles, mean and sd are taken over the pooled samples, as nnU-Net does.

    Args:
        cases: ``(image_path, label_path)`` pairs.
        samples_per_case: voxels drawn per case (all foreground voxels if fewer).
        seed: sampling seed; the same cases and seed give the same fingerprint.
    """
    pooled = []
    for index, (image_path, label_path) in enumerate(cases):
        image, affine = load_image(image_path)
        labels, _ = load_label(label_path, image.shape, affine)
        values = image[labels > 0]
        if values.size > samples_per_case:
            rng = np.random.default_rng([seed, index])
            values = rng.choice(values, samples_per_case, replace=False)
        pooled.append(values.astype(np.float64))
    if not pooled or sum(v.size for v in pooled) == 0:
        raise ValueError("no foreground voxels: the fingerprint needs labelled cases")
    values = np.concatenate(pooled)
    lower, upper = np.percentile(values, CLIP_PERCENTILES)
    return Fingerprint(
        lower=float(lower),
        upper=float(upper),
        mean=float(values.mean()),
        std=float(max(values.std(), 1e-8)),
        num_cases=len(pooled),
        num_voxels=int(values.size),
    )


def training_fingerprint(dataset_fingerprint: str | os.PathLike, fingerprint: str | os.PathLike) -> Path:
    """The fingerprint a training run normalises with, kept beside its weights (a train
    config's ``initialize``), so that inference normalises as training did.

    A run from a prepared dataset copies the dataset's (``stmt-prepare-data``'s
    ``fingerprint.json``; atomically, so a link to the shipped demo's is replaced, never written
    through). A run without one (MONAI Label's bundle training on its datastore) continues the
    weights it serves and keeps their fingerprint.

    Args:
        dataset_fingerprint: the prepared dataset's ``fingerprint.json``.
        fingerprint: the one beside the weights (``models/fingerprint.json``).

    Returns:
        ``fingerprint``.

    Raises:
        ImageError: neither file is there (one line naming the dataset's and saying how to make it).
    """
    if Path(dataset_fingerprint).is_file():
        return Fingerprint.load(dataset_fingerprint).save(fingerprint)
    if Path(fingerprint).is_file():
        return Path(fingerprint)
    raise ImageError(dataset_fingerprint, f"fingerprint file not found, nor {fingerprint} beside the weights (run stmt-prepare-data first)")
