"""The self-training student's batches: fully labelled, CPL and PL cases in equal proportions.

Paper section 2.2 (Fig. 2a): "the input batch for model training consisted of these three types
of data in equal proportions". :class:`StreamBatchSampler` is the ``batch_sampler`` of the
``coarse_abdomen`` and ``organ_selftrain`` students: it fills every batch round-robin over the
streams that :func:`stmt_monai.data.datalists.student_datalist` tags, so that each term of eq. (1)
sees its own kind of case in every batch; under torch.distributed each rank takes a disjoint
share of every stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

from stmt_monai.training.losses import STREAMS


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
        data: the datalist; ``data[i][stream_key]`` names item ``i``'s stream, ``default_stream``
            (fully labelled) where it has none (a MONAI Label datastore's image with its label).
        batch_size: cases per batch (per rank).
        num_batches: batches per epoch; default ``ceil(len(data) / (batch_size * num_replicas))``.
        streams: stream names, in round-robin order.
        seed: shuffling seed, the same on every rank; ``set_epoch`` changes the order per epoch.
        num_replicas, rank: distributed data parallel set-up (``stmt_monai.training.distributed.world_size()``,
            ``rank()``); rank must be in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        batch_size: int,
        num_batches: int | None = None,
        streams: Sequence[str] = STREAMS,
        stream_key: str = "stream",
        default_stream: str = STREAMS[0],
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.batch_size = int(batch_size)
        self.indices = {s: [i for i, item in enumerate(data) if item.get(stream_key, default_stream) == s] for s in streams}
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
