"""A whole federated job in one process: build the task's clients, run rounds, record results.

This is the library entry point behind ``secagg run`` and ``secagg.run``. It does not print;
pass ``on_round`` to see progress.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from secagg import crypto, rounds
from secagg.builtin import task_for
from secagg.client import Client, resolve_device
from secagg.config import RunConfig
from secagg.records import RunRecords, RunResult
from secagg.rounds import RoundMetrics
from secagg.server import Server
from secagg.task import Site, Task
from secagg.transport.inprocess import InProcessTransport

MODEL_FILE = "model.pt"


def simulated_site(config: RunConfig, index: int) -> Site:
    """Client ``index`` of a simulation: every client shares ``config.data_dir`` and takes its
    own part of it."""
    return Site(
        index,
        f"site-{index + 1}",
        config.clients,
        Path(config.data_dir),
        partition=True,
        seed=config.seed,
        download=config.download,
        settings=config.task_settings,
    )


def build_clients(config: RunConfig, task: Task) -> list[Client]:
    """One client per roster position, each with its own data; all start from the job's model
    (checked: same names, shapes, dtypes and initial weights as client 0's)."""
    make_cipher = crypto.for_client(config.he, config.keys_dir, config.plain_precision)
    device = resolve_device(config.device)
    clients: list[Client] = []
    for index in range(config.clients):
        client = Client(task, simulated_site(config, index), config, make_cipher, device)
        if clients:
            client.check_model(clients[0].signature)
        clients.append(client)
    return clients


def run_job(
    config: RunConfig,
    *,
    task: Task | None = None,
    resume_dir: str | Path | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    tags: dict[str, str] | None = None,
    resume_changes: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run a job (or continue the interrupted one in ``resume_dir``); return its result.

    ``task`` overrides the one the config names. ``tags`` are added to the MLflow run
    (``mlflow.parentRunId`` nests it under another run). A resumed run continues with the
    config it was started with; ``resume_changes`` are settings to change on the way
    (``records.plan_resume`` says which may: ``{"rounds": 12}`` extends it).
    """
    records = RunRecords.open(config, resume_dir, tags or {}, changes=resume_changes or {})
    config = records.config.validate()
    clients = build_clients(config, task_for(config, task))
    cipher = crypto.for_server(config.he, config.keys_dir, config.plain_precision)
    server = Server(cipher, records.output)
    transport = InProcessTransport(clients)
    records.start(sum(p.numel() for p in clients[0].model.parameters()))

    if records.resumed is not None:
        # Replay the aggregates to rebuild the global model every client held, then go on.
        for round_num in range(1, records.first_round):
            stamp = rounds.round_stamp(records.job_id, round_num, transport.roster)
            transport.apply(stamp, *records.resumed.aggregates(round_num))

    records.run_rounds(server, transport, on_round or (lambda m: None))
    return records.finish([clients[0].save(records.output / MODEL_FILE)])
