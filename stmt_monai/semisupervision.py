"""Semi-supervision of StMt: corrected pseudo labels, three-stream batches, the EMA teacher.

Paper section 2.2 (Fig. 2a, 2b); SPEC.md "Organs by self-training" and "Tumors by mean teacher".

- :func:`correct_pseudo_label`: step 3 of self-training, the paper's exact rule.
- :func:`correct_tumor_pseudo_label`: the mean teacher's real-time correction.
- :class:`StreamBatchSampler`: every batch holds fully labelled, corrected pseudo-labelled
  (CPL) and pseudo-labelled (PL) cases in equal proportions.
- :func:`student_datalist`: the student's training list, each case tagged with its stream.
- :func:`ema_teacher`: the mean teacher's EMA of the student (ignite's ``EMAHandler``).
- :func:`attach_roi`: the stage-2 region of interest of each tumor case (organ pseudo label,
  the case's own organ labels, or the whole image).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from stmt_monai.io import case_name, image_datalist, load_label
from stmt_monai.labels import ORGAN_CLASSES
from stmt_monai.losses import CPL, LABELLED, PL, STREAMS  # stream names: the loss terms of eq. (1), (2)


def annotated_organ_classes(annotation: np.ndarray) -> tuple[int, ...]:
    """The set A of a partial annotation: organ classes with at least one annotated voxel."""
    present = set(np.unique(np.asarray(annotation)).tolist())
    return tuple(c for c in ORGAN_CLASSES if c in present)


def correct_pseudo_label(
    pseudo_label: np.ndarray, annotation: np.ndarray, annotated_classes: Iterable[int] | None = None
) -> np.ndarray:
    """Correct a teacher's pseudo label with a partial annotation (paper Fig. 2a, step 2).

    Rule (paper, section 2.2): let A be the set of organ classes annotated in the partial label.
    In the pseudo label, set voxels whose value is in A to 0; then write every annotated voxel's
    label (a class in A) at its position. Classes outside A keep the teacher's value, except
    where an annotated voxel overwrites them.

    Args:
        pseudo_label: ``(X, Y, Z)`` integer organ labels predicted by the teacher.
        annotation: ``(X, Y, Z)`` partial annotation on the same grid (0 = not annotated).
        annotated_classes: A; by default the organ classes present in ``annotation``
            (:func:`annotated_organ_classes`). Labels outside A in the annotation, such as the
            tumor, are not written.

    Returns:
        The corrected pseudo label (CPL), same shape and dtype as ``pseudo_label``.
    """
    pseudo_label = np.asarray(pseudo_label)
    annotation = np.asarray(annotation)
    if pseudo_label.shape != annotation.shape:
        raise ValueError(f"pseudo label {pseudo_label.shape} and annotation {annotation.shape} differ in shape")
    classes = np.asarray(
        tuple(annotated_classes) if annotated_classes is not None else annotated_organ_classes(annotation),
        dtype=annotation.dtype if annotation.dtype.kind in "iu" else np.int64,
    )
    corrected = pseudo_label.copy()
    corrected[np.isin(corrected, classes)] = 0
    annotated = np.isin(annotation, classes)
    corrected[annotated] = annotation[annotated]
    return corrected


def correct_tumor_pseudo_label(teacher_labels: torch.Tensor, tumor_annotation: torch.Tensor) -> torch.Tensor:
    """Real-time correction of the mean teacher's tumor prediction (paper Fig. 2b).

    Annotated tumor voxels are tumor whatever the teacher says; elsewhere the teacher's
    prediction stands, so tumors the annotation missed stay in the extra target. (The organ
    rule would erase every teacher tumor voxel outside the annotation, i.e. turn the extra
    target into the annotation itself; for one class "correct" can only mean this union.)

    Args:
        teacher_labels: ``(B, 1, X, Y, Z)`` binary tumor labels (argmax of the teacher).
        tumor_annotation: same shape, 1 where a tumor is annotated.

    Returns:
        ``(B, 1, X, Y, Z)`` corrected pseudo label (same dtype as ``teacher_labels``).
    """
    return torch.where(tumor_annotation > 0, torch.ones_like(teacher_labels), teacher_labels)


def load_datalist(path: str | os.PathLike, key: str = "training") -> list[dict]:
    """A MONAI datalist section with paths made absolute against the JSON's folder."""
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: datalist not found")
    if key not in json.loads(path.read_text()):
        return []
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(path.parent))


def student_datalist(
    labelled: str | os.PathLike | Sequence[Mapping],
    pseudo_labelled: str | os.PathLike | Sequence[Mapping] | None,
    streams: Sequence[str] = STREAMS,
    labelled_key: str = "training",
    pseudo_key: str = "training",
) -> list[dict]:
    """The student's training list: fully labelled cases plus the pseudo-label job's output.

    Args:
        labelled: datalist JSON (or list) of fully labelled cases; tagged ``stream="labelled"``.
        pseudo_labelled: datalist JSON (or list) written by the pseudo-label job, whose items carry
            ``stream`` = ``"cpl"`` (corrected, from partial cases) or ``"pl"`` (unlabelled).
        streams: the streams to keep (e.g. ``("labelled", "cpl")`` for self-training without the
            unlabelled cases, a row of the paper's ablation).

    Returns:
        Items ``{"image", "label", "stream", ...}``: each item keeps only the fields that every
        item has (e.g. ``name``), because a DataLoader collates a batch of dicts key by key and
        the streams are mixed within a batch (the fully labelled list carries ``tumor``, the
        pseudo-labelled one ``annotated_classes`` and ``quality`` of varying length).
    """

    def _items(source, key):
        if source is None:
            return []
        if isinstance(source, (str, os.PathLike)):
            return load_datalist(source, key)
        return [dict(item) for item in source]

    items = [{**item, "stream": LABELLED} for item in _items(labelled, labelled_key)]
    for item in _items(pseudo_labelled, pseudo_key):
        if item.get("stream") not in (CPL, PL):
            raise ValueError(f"pseudo-labelled item {item.get('image')} has no stream 'cpl' or 'pl'")
        items.append(dict(item))
    items = [item for item in items if item["stream"] in streams]
    shared = set.intersection(*(set(item) for item in items)) if items else set()
    return [{key: value for key, value in item.items() if key in shared} for item in items]


class StreamBatchSampler(Sampler):
    """Batches that hold the streams (fully labelled, CPL, PL) in equal proportions.

    Batch positions are filled round-robin over the streams that have cases (batch size 3:
    one case of each; batch size 2: the streams alternate, so over any three batches each
    stream fills two places). Each stream draws its cases from its own shuffled order,
    reshuffled when used up, so small streams repeat and large ones are sampled.

    With ``num_replicas > 1`` (torch.distributed, the bundles' ``multi_gpu_train.json``) every rank
    takes a disjoint share of each stream's shuffled order (every ``num_replicas``-th case) and
    fills its batch positions in the same stream order as the other ranks, so the ranks see
    different cases, in the same proportions, and the same number of batches.

    Args:
        data: the datalist; ``data[i][stream_key]`` names item ``i``'s stream.
        batch_size: cases per batch (per rank).
        num_batches: batches per epoch; default ``ceil(len(data) / (batch_size * num_replicas))``.
        streams: stream names, in round-robin order.
        seed: shuffling seed, the same on every rank; ``set_epoch`` changes the order per epoch.
        num_replicas, rank: distributed data parallel set-up (``stmt_monai.distributed.world_size()``,
            ``rank()``); rank must be in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        batch_size: int,
        num_batches: int | None = None,
        streams: Sequence[str] = STREAMS,
        stream_key: str = "stream",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.batch_size = int(batch_size)
        self.indices = {s: [i for i, item in enumerate(data) if item[stream_key] == s] for s in streams}
        self.streams = [s for s in streams if self.indices[s]]
        if not self.streams:
            raise ValueError("no case belongs to any of the streams " + ", ".join(streams))
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.num_batches = num_batches or max(1, math.ceil(len(data) / (self.batch_size * self.num_replicas)))
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def _stream_order(self, stream: str, rng: np.random.Generator) -> Iterator[int]:
        """Rank ``rank``'s share of the stream's endless sequence of shuffled passes: every
        ``num_replicas``-th position. All ranks draw the same permutations (same seed), so within
        a pass over a stream of at least ``num_replicas`` cases the shares are disjoint."""
        indices = np.asarray(self.indices[stream])
        position = 0
        while True:
            for index in indices[rng.permutation(len(indices))].tolist():
                if position % self.num_replicas == self.rank:
                    yield index
                position += 1

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        orders = {s: self._stream_order(s, np.random.default_rng([self.seed, self.epoch, k])) for k, s in enumerate(self.streams)}
        offset = int(rng.integers(len(self.streams)))  # which stream opens the epoch
        position = 0
        for _ in range(self.num_batches):
            batch = []
            for _ in range(self.batch_size):
                stream = self.streams[(offset + position) % len(self.streams)]
                batch.append(next(orders[stream]))
                position += 1
            yield batch


def sigmoid_rampup(current: float, length: float) -> float:
    """The sigmoid-shaped ramp-up of semi-supervised weights (Laine and Aila 2017, used by the mean
    teacher): ``exp(-5 (1 - t)^2)`` with ``t = current / length`` clipped to ``[0, 1]``.

    Args:
        current: progress, e.g. epochs done (fractional).
        length: progress at which the ramp reaches 1; ``<= 0`` means no ramp-up (always 1).

    Returns:
        A factor in ``(0, 1]``: ``exp(-5) = 0.0067`` at the start, 1 from ``length`` on.
    """
    if length <= 0:
        return 1.0
    t = min(max(float(current) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


#: mean-teacher EMA decay of the tumor bundle (teacher = decay * teacher + (1 - decay) * student)
EMA_DECAY = 0.99


def ema_teacher(
    student: torch.nn.Module,
    decay: float = EMA_DECAY,
    warmup_iters: int = 0,
    warmup_decay: float = 0.5,
    handle_buffers: str = "copy",
):
    """The mean teacher: an exponential moving average of the student's weights (paper Fig. 2b).

    After every training iteration (``Events.ITERATION_COMPLETED``, once attached to the trainer),
    each teacher parameter becomes ``decay * teacher + (1 - decay) * student``. The teacher starts
    as a copy of the student and is in eval mode. This is ignite's
    :class:`~ignite.handlers.EMAHandler`, whose ``momentum`` is ``1 - decay``.

    Warm-up (off by default, not in the paper): a randomly initialised teacher marks large parts
    of every volume as tumor, and with ``decay`` 0.99 it takes a few hundred iterations to forget
    its start. With ``warmup_iters > 0`` the decay rises linearly from ``warmup_decay`` to
    ``decay`` over the first ``warmup_iters`` iterations (EMAHandler's own momentum warm-up), so
    the teacher follows the student closely while both are untrained, as the original mean
    teacher does (Tarvainen and Valpola 2017: decay ``min(1 - 1 / (step + 1), decay)``). The
    warm-up counter is not checkpointed: a resumed run warms up again.

    Buffers are not averaged: with ``handle_buffers="copy"`` the teacher takes the student's
    buffers as they are after each step (the students' instance norm keeps no running statistics,
    so today there are none; batch-norm statistics would be copied, not averaged).

    Args:
        student: the network being trained (a ``DistributedDataParallel`` is unwrapped).
        decay: EMA decay in ``(0, 1)``; 0.99 averages over roughly the last 100 iterations.
        warmup_iters: iterations of the decay warm-up; 0 for none (the paper's plain EMA).
        warmup_decay: decay at the first iteration of the warm-up.
        handle_buffers: ``"copy"``, ``"update"`` (EMA of float buffers too) or ``"ema_train"``
            (see ``EMAHandler``).

    Returns:
        The ``EMAHandler``: attach it to the trainer (MONAI ``train_handlers``); the teacher is its
        ``ema_model``.
    """
    from ignite.handlers import EMAHandler

    for name, value in (("decay", decay), ("warmup_decay", warmup_decay)):
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"EMA {name} must be in (0, 1), got {value}")
    warmup = {}
    if int(warmup_iters) > 0:
        warmup = {"momentum_warmup": 1.0 - float(warmup_decay), "warmup_iters": int(warmup_iters)}
    return EMAHandler(student, momentum=1.0 - float(decay), handle_buffers=handle_buffers, **warmup)


def _has_organ_labels(item: Mapping) -> bool:
    if "organs" in item:  # triage datalists carry the annotated organ set
        return bool(item["organs"])
    labels, _ = load_label(item["label"])
    return bool(np.isin(labels, ORGAN_CLASSES).any())


def attach_roi(
    datalist: str | os.PathLike | Sequence[Mapping],
    roi_dir: str | os.PathLike | None = None,
    key: str = "training",
) -> list[dict]:
    """Give each case of a tumor-stage list its stage-2 region of interest (``roi`` key).

    The tumor student sees the region of interest of stage 2, the abdomen box; a tumor-annotated
    case may have no organ labels, so its box cannot come from its label alone. Per item, the
    first that applies:

    1. ``roi_dir/<case>.nii.gz`` exists (the organ pseudo label of ``organ_selftrain``, or a
       stage-1 abdomen mask, same case name): ``roi`` is that path (its bounding box + margin);
    2. the item already has a ``roi``: kept;
    3. the item has no label (inference), or a label with organ voxels: no ``roi`` (without a label
       the whole image is used; with one, its organs + tumor give the box, as in validation);
    4. a tumor-only label: ``roi`` = :data:`~stmt_monai.transforms.WHOLE_IMAGE_ROI` (no crop),
       since the tumor's own box is not the abdomen.

    Args:
        datalist: a MONAI datalist JSON (section ``key``), a list of items ``{"image", "label"?}``,
            a folder of images (:func:`stmt_monai.io.image_datalist`) or one image file.
        roi_dir: folder of masks named ``<case>.nii.gz`` on the images' grids; ``None`` for none.
        key: datalist section to read from a JSON.

    Returns:
        New items (paths absolute for a JSON, as MONAI resolves them) with ``roi`` where needed.
    """
    from stmt_monai.transforms import WHOLE_IMAGE_ROI

    source = datalist
    if isinstance(datalist, (str, os.PathLike)):
        path = Path(datalist)
        if path.is_file() and path.suffix == ".json":
            source = load_datalist(path, key)
        elif path.is_dir():
            source = image_datalist(path)
        elif path.exists():
            source = [{"image": str(path)}]
        else:
            raise FileNotFoundError(f"{path}: no datalist, image or folder of images")
    items = []
    for item in source:
        item = dict(item)
        roi = Path(roi_dir) / f"{case_name(item['image'])}.nii.gz" if roi_dir else None
        if roi is not None and roi.exists():
            item["roi"] = str(roi)
        elif item.get("roi") is None and item.get("label") is not None and not _has_organ_labels(item):
            item["roi"] = WHOLE_IMAGE_ROI
        items.append(item)
    return items
