"""stmt_monai.training.engines: the self-training trainer's per-stream loss and per-epoch batch order."""

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
    trainer = SelfTrainingTrainer(
        device="cpu",
        max_epochs=3,
        train_data_loader=DataLoader(data, batch_sampler=sampler),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
        loss_function=WeightedStreamsLoss(),
    )
    seen: dict[int, list[int]] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.setdefault(e.state.epoch, []).extend(int(e.state.batch[i]["index"]) for i in range(2))
    )
    trainer.run()
    assert sampler.epoch == 3
    assert len({tuple(order) for order in seen.values()}) == 3  # without set_epoch all three were equal
    output = trainer.state.output[0]
    assert "loss" in output and {k for k in output if k.startswith("loss_")} <= {"loss_labelled", "loss_cpl", "loss_pl"}
