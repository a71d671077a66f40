"""NumPy arrays and torch tensors side by side, without importing torch.

The cascade's CPU path with OpenVINO (the default) runs on NumPy arrays only, and a process that
never imports torch starts about 1.2 s sooner (``python -X importtime``: torch is most of
``stmt-segment``'s imports). Code that accepts either kind asks these helpers instead of
``isinstance(x, torch.Tensor)``: a value can only be a tensor once torch has been imported, so
the check never imports it.
"""

from __future__ import annotations

import sys

import numpy as np


def is_tensor(value) -> bool:
    """True for a ``torch.Tensor`` (False without importing torch when nothing imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def as_numpy(value) -> np.ndarray:
    """A tensor (any device) or array-like as a NumPy array (no copy for a CPU tensor or an array)."""
    return value.detach().cpu().numpy() if is_tensor(value) else np.asarray(value)


def device_type(device) -> str:
    """``"cpu"`` or ``"cuda"`` of a device given as a string (``"cuda:1"``) or a ``torch.device``."""
    return getattr(device, "type", None) or str(device).split(":", 1)[0]
