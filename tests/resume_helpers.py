"""A small real training run with :class:`ResumableCheckpoint`, killed (SIGKILL) at a chosen moment.

Run as a script by tests/test_handlers.py, in its own process so that each kill is a real one:

    python tests/resume_helpers.py BASE_DIR MAX_EPOCHS KILL [KILL ...]

trains one run per KILL, each in a forked child and folder ``BASE_DIR/<KILL with _ for :>``, and
prints ``<KILL> killed`` for each child that died by SIGKILL. KILL is ``iteration:E:I`` (in iteration I of epoch E), ``writing:E`` (half-way through writing
epoch E's checkpoint), ``replacing:E`` (epoch E's checkpoint written, the previous one kept, not
yet renamed into place) or ``saved:E`` (just after epoch E's checkpoint is in place).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from stmt_monai.training import handlers
from stmt_monai.training.handlers import ResumableCheckpoint

#: iterations per epoch
BATCHES = 4


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(save_dir: str | os.PathLike) -> tuple[Engine, torch.nn.Module]:
    """SGD with momentum on a fixed regression problem; the same on every call."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    network = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(BATCHES)]

    def step(engine, batch):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(network(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    trainer.data = data
    ResumableCheckpoint(save_dir, {"network": network, "optimizer": optimizer, "trainer": trainer}).attach(trainer)
    return trainer, network


def run(save_dir: str, max_epochs: int, kill: str | None = None) -> torch.nn.Module:
    trainer, network = make_trainer(save_dir)
    kind, *where = (kill or "none").split(":")
    where = [int(v) for v in where]

    if kind == "iteration":

        @trainer.on(Events.ITERATION_STARTED)
        def _kill(engine):
            if engine.state.epoch == where[0] and (engine.state.iteration - 1) % BATCHES + 1 == where[1]:
                _die()

    elif kind == "saved":

        @trainer.on(Events.EPOCH_COMPLETED)
        def _kill(engine):  # registered after the checkpoint handler: runs once the save is done
            if engine.state.epoch == where[0]:
                _die()

    elif kind in ("writing", "replacing"):
        real_save, real_replace = torch.save, os.replace

        def save(obj, path, *args, **kwargs):
            if trainer.state.epoch != where[0] or kind != "writing":
                return real_save(obj, path, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as f:  # half of the bytes reach the disk, then the process dies
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            _die()

        def replace(source, target):
            if kind == "replacing" and trainer.state.epoch == where[0] and Path(target).name == "checkpoint_last.pt":
                _die()
            return real_replace(source, target)

        handlers.torch.save = save
        handlers.os.replace = replace
    trainer.run(trainer.data, max_epochs=max_epochs)
    return network


def kill_runs(base_dir: str | os.PathLike, max_epochs: int, kills: list[str]) -> dict[str, int]:
    """Each ``kill`` in a forked child training into ``base_dir/<kill>``; ``{kill: wait status}``.

    Forked from a process that has run no torch operation yet, so the children start clean
    (and a kill costs no new interpreter).
    """
    statuses = {}
    for kill in kills:
        pid = os.fork()
        if pid == 0:  # the child: train until the kill
            try:
                run(str(Path(base_dir) / kill.replace(":", "_")), max_epochs, kill)
            finally:
                os._exit(0)  # not killed: the parent sees exit status 0
        statuses[kill] = os.waitpid(pid, 0)[1]
    return statuses


if __name__ == "__main__":
    base, epochs, kills = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    for kill, status in kill_runs(base, epochs, kills).items():
        print(f"{kill} {'killed' if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else f'status {status}'}", flush=True)
