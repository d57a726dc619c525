"""A whole federated job from a RunConfig: build parties, run rounds, record results.

This is the library entry point behind ``secagg run``. It does not print; pass ``on_round`` to
see progress.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from secagg import crypto, rounds
from secagg.client import Client, TrainSettings
from secagg.config import RunConfig
from secagg.crypto import ClientCipher
from secagg.data import Dataset, Split, dirichlet_partition, load_dataset
from secagg.errors import ConfigError
from secagg.files import atomic_write
from secagg.models import build_model
from secagg.records import RunRecords, RunResult
from secagg.rounds import RoundAggregates, RoundMetrics
from secagg.server import Server
from secagg.transport.inprocess import InProcessTransport

MODEL_FILE = "model.pt"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    return device


def build_clients(
    config: RunConfig, dataset: Dataset, make_cipher: Callable[[], ClientCipher]
) -> list[Client]:
    """One client per Dirichlet shard; every client starts from the same seeded model."""
    return [
        build_client(config, dataset, i, dataset.train.subset(shard), make_cipher())
        for i, shard in enumerate(partition(config, dataset))
    ]


def partition(config: RunConfig, dataset: Dataset) -> list[np.ndarray]:
    """The job's Dirichlet shards of the training data: the same for every party that
    computes them, since they depend only on the dataset and the job's seed."""
    return dirichlet_partition(
        dataset.train.y.numpy(),
        config.clients,
        config.alpha,
        config.seed,
        config.min_client_samples,
    )


def build_client(
    config: RunConfig, dataset: Dataset, index: int, train: Split, cipher: ClientCipher
) -> Client:
    """Client ``index`` of the job, training on ``train``, from the job's seeded model."""
    settings = TrainSettings(
        config.local_epochs,
        config.batch_size,
        config.optimizer,
        config.lr,
        config.momentum,
        config.seed,
    )
    return Client(
        client_id=index,
        model=build_model(config.model, dataset.in_shape, dataset.classes, config.seed),
        train=train,
        test=dataset.test,
        cipher=cipher,
        settings=settings,
        device=resolve_device(config.device),
    )


def run_job(
    config: RunConfig,
    *,
    resume_dir: str | Path | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    tags: dict[str, str] | None = None,
) -> RunResult:
    """Run a job (or continue the interrupted one in ``resume_dir``); return its result.

    ``tags`` are added to the MLflow run (``mlflow.parentRunId`` nests it under another run).
    """
    records = RunRecords.open(config, resume_dir, tags or {})
    config = records.config.validate()
    dataset = load_dataset(config.dataset, config.data_dir, config.download)
    server = Server(crypto.for_server(config), records.output)
    clients = build_clients(config, dataset, crypto.for_client(config))
    transport = InProcessTransport(clients)
    records.start(sum(p.numel() for p in clients[0].model.parameters()))

    if records.resumed is not None:
        # Replay the aggregates to rebuild the global model every client held, then go on.
        for round_num in range(1, records.first_round):
            stamp = rounds.round_stamp(records.job_id, round_num, transport.roster)
            transport.apply(stamp, *records.resumed.aggregates(round_num))

    def after_round(metrics: RoundMetrics) -> None:
        records.after_round(server, metrics)
        if on_round is not None:
            on_round(metrics)

    def checkpoint(round_num: int, aggregates: RoundAggregates) -> None:
        records.checkpoint(server, round_num, aggregates)

    span = range(records.first_round, config.rounds + 1)
    try:
        rounds.run(server, transport, records.job_id, span, after_round, checkpoint)
    except BaseException:
        records.fail()
        raise
    return records.finish([save_model(clients[0], records.output / MODEL_FILE)])


def save_model(client: Client, path: Path) -> Path:
    """The decrypted global model as a float32 state dict (temp file, then rename)."""
    import io

    buffer = io.BytesIO()
    state = {k: v.detach().to("cpu") for k, v in client.model.state_dict().items()}
    torch.save(state, buffer)
    return atomic_write(path, buffer.getvalue())
