"""stmt_monai.training.engines: the self-training trainer's per-stream loss and per-epoch batch order."""

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader

from stmt_monai.data.sampling import StreamBatchSampler
from stmt_monai.training.engines import SelfTrainingTrainer
from stmt_monai.training.losses import WeightedStreamsLoss


def test_self_training_trainer_draws_new_batches_every_epoch_and_logs_stream_terms():
    streams = ["labelled"] * 2 + ["cpl"] * 4 + ["pl"] * 4
    data = [
        {"image": torch.randn(1, 4, 4, 4), "label": torch.randint(0, 2, (1, 4, 4, 4)), "stream": s, "index": i}
        for i, s in enumerate(streams)
    ]
    sampler = StreamBatchSampler(data, batch_size=2, seed=0)
    network = torch.nn.Conv3d(1, 2, 1)
    weights = {"labelled": 1.0, "cpl": 0.5, "pl": 0.25}  # eq. (1) with lambda1 = 0.5, lambda2 = 0.25
    trainer = SelfTrainingTrainer(
        device="cpu",
        max_epochs=3,
        train_data_loader=DataLoader(data, batch_sampler=sampler),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
        loss_function=WeightedStreamsLoss(weights),
    )
    seen: dict[int, list[int]] = {}
    logged: list[tuple[set[str], dict]] = []

    def record(engine):
        batch = engine.state.batch
        seen.setdefault(engine.state.epoch, []).extend(int(batch[i]["index"]) for i in range(2))
        logged.append(({batch[i]["stream"] for i in range(2)}, dict(engine.state.output[0])))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert sampler.epoch == 3
    assert len({tuple(order) for order in seen.values()}) == 3  # without set_epoch all three were equal
    # every iteration logs the unweighted term of each stream of its batch, and nothing else, and the
    # total is their weighted sum: L_o = L_ol + lambda1 L_cpl + lambda2 L_pl (a stream absent: 0)
    assert len(logged) == 3 * 5
    for streams, output in logged:
        terms = {k[len("loss_"):]: float(v) for k, v in output.items() if k.startswith("loss_")}
        assert set(terms) == streams, (streams, output)
        assert float(output["loss"]) == pytest.approx(sum(weights[s] * terms[s] for s in streams), rel=1e-5)
    assert set().union(*(streams for streams, _ in logged)) == set(weights)  # each stream's term is logged
