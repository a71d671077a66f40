"""The one preprocessing path of StMt, shared by training, evaluation and inference.

SPEC.md, "Preprocessing" and paper section 2.1:

- intensity: clip at the 0.5 / 99.5 percentiles of foreground voxels, z-score with the global
  foreground mean and sd, numbers from a dataset fingerprint (:class:`Fingerprint`);
- stage 1: the whole CT resampled to 128^3;
- stage 2: the region of interest found by stage 1, cropped from the original-resolution CT
  and resampled to 192^3; in training the box of the label (:func:`abdomen_roi`), at inference
  the box of stage 1's prediction (:func:`abdomen_roi_from_prediction`; :func:`roi_coverage`
  measures the share of a case's labelled voxels it keeps);
- the inverse (:func:`restore_label_map`): a label map at network resolution goes back to the
  crop (nearest neighbour), is zero-padded into the full grid and returned in the input file's
  own voxel order, so it can be written with the input's exact shape and affine.

All geometry is done in a canonical RAS voxel order (:func:`to_canonical`), so a file in any
orientation gives the same network input; :class:`CaseGeometry` records what was done so
the inverse is exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from stmt_monai.io import ImageError, load_image, load_label, write_text_atomic

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
        if isinstance(image, torch.Tensor):
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
            raise ImageError(path, "fingerprint file not found (run scripts/prepare_data.py first)") from None
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
