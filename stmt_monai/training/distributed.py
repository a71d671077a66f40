"""torch.distributed for the bundles' ``multi_gpu_*.json`` configs (one process per GPU, by torchrun).

The model-zoo convention: ``torchrun --nproc_per_node N -m monai.bundle run ...`` with a
``multi_gpu_train.json`` layered over the bundle's training config. The config calls
:func:`init_distributed` in ``initialize`` and :func:`destroy_distributed` in ``finalize``, takes
its ``device`` from :func:`local_device` and wraps ``network`` in
``torch.nn.parallel.DistributedDataParallel`` (``device_ids`` from :func:`device_ids`).

The backend is chosen from the machine: NCCL when torch sees a GPU, gloo on the CPU (tests and
CPU-only machines run the same configs with gloo).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True outside torch.distributed and on rank 0 inside it: the process that saves and logs."""
    return rank() == 0


def default_backend() -> str:
    """``"nccl"`` when torch sees a CUDA device, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """This process's device: ``cuda:<LOCAL_RANK>`` (torchrun sets ``LOCAL_RANK``) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_ids(device: torch.device | str) -> list[torch.device] | None:
    """``DistributedDataParallel(device_ids=...)``: ``[device]`` on a GPU, ``None`` on the CPU."""
    device = torch.device(device)
    return [device] if device.type == "cuda" else None


def init_distributed(backend: str | None = None) -> None:
    """Join the process group that torchrun describes (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``...).

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default :func:`default_backend`. On a GPU the current
            CUDA device is set to :func:`local_device` first (NCCL needs one GPU per process).

    Does nothing when the group exists already.
    """
    if is_distributed():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend or default_backend())


def destroy_distributed() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still saves)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
