"""A whole federated job in one process: build the task's clients, run rounds, record results.

This is the library entry point behind ``secagg run`` and ``secagg.run``. It does not print;
pass ``on_round`` to hear each round's metrics and ``on_progress`` to follow every long step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secagg import crypto, rounds
from secagg.builtin import task_for
from secagg.client import Client, resolve_device, simulated_ciphers, use_threads
from secagg.config import RunConfig
from secagg.crypto.masking import SimulatedIdentities
from secagg.files import atomic_write
from secagg.records import RunRecords, RunResult
from secagg.rounds import RoundMetrics
from secagg.server import Server
from secagg.task import Task, simulated_site
from secagg.transport import Progress, no_progress
from secagg.transport.inprocess import InProcessTransport

if TYPE_CHECKING:
    from secagg.transport.ray import RayTransport

MODEL_FILE = "model.pt"


def build_clients(
    config: RunConfig,
    task: Task,
    indexes: Iterable[int] = (),
    on_progress: Progress = no_progress,
) -> list[Client]:
    """Clients of the population (``indexes``, default all), each with its own data; all start
    from the job's model (checked: same names, shapes, dtypes and initial weights as the
    first one's). ``on_progress`` hears each one ready (phase ``clients``)."""
    identities = SimulatedIdentities() if config.he and config.masking else None
    make_cipher = simulated_ciphers(config, identities)
    device = resolve_device(config.device)
    use_threads(config)
    clients: list[Client] = []
    chosen = list(indexes) or list(range(config.clients))
    on_progress("clients", 0, len(chosen))
    for done, index in enumerate(chosen, 1):
        client = Client(task, simulated_site(config, index), config, make_cipher, device)
        if clients:
            client.check_model(clients[0].signature)
        clients.append(client)
        on_progress("clients", done, len(chosen))
    return clients


def simulation(
    config: RunConfig, task: Task, on_progress: Progress = no_progress
) -> InProcessTransport:
    """The in-process transport of a job: one client per member of the population, or, when
    only ``clients_per_round`` take part in each round, that many reusable clients plus client
    0 as the evaluator."""
    per_round = config.per_round
    if per_round == config.clients:
        return InProcessTransport(build_clients(config, task, on_progress=on_progress))
    first = rounds.sample_clients(config.clients, per_round, config.seed, 1)
    clients = build_clients(config, task, [0, *first], on_progress)
    return InProcessTransport(
        clients[1:],
        lambda round_num: rounds.sample_clients(config.clients, per_round, config.seed, round_num),
        functools.partial(simulated_site, config),
        evaluator=clients[0],
    )


def run_job(
    config: RunConfig,
    *,
    task: Task | None = None,
    resume_dir: str | Path | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    tags: dict[str, str] | None = None,
    resume_changes: Mapping[str, Any] | None = None,
    on_progress: Progress = no_progress,
) -> RunResult:
    """Run a job (or continue the interrupted one in ``resume_dir``); return its result.

    ``task`` overrides the one the config names. ``tags`` are added to the MLflow run
    (``mlflow.parentRunId`` nests it under another run). A resumed run continues with the
    config it was started with; ``resume_changes`` are settings to change on the way
    (``resume.plan_resume`` says which may: ``{"rounds": 12}`` extends it). ``on_progress``
    hears every long step, before and in each round (``secagg.transport.Progress``).
    """
    if task is not None and config.task is None and resume_dir is None:
        # Named by its class, so the run is labelled as this task (never the built-in one's
        # dataset and model) and a resume imports it rather than running another task.
        config = replace(config, task=f"{type(task).__module__}:{type(task).__qualname__}")
    records = RunRecords.open(config, resume_dir, tags or {}, changes=resume_changes or {})
    config = records.config.validate()
    transport = _transport(config, task, on_progress)
    try:
        cipher = crypto.for_server(config.he, config.keys_dir, config.precision, config.privacy())
        server = Server(cipher, records.output, masking=config.he and config.masking)
        on_progress("tracking", 0, 1)  # opening an MLflow store can take seconds
        records.start(transport.parameters)
        on_progress("tracking", 1, 1)
        if records.resumed is not None:
            # Replay the aggregates to rebuild the global model every client held, then go on.
            replayed = records.first_round - 1
            for round_num in range(1, records.first_round):
                stamp = rounds.round_stamp(records.job_id, round_num, transport.roster)
                stamp = replace(stamp, attempt=records.resumed.attempt(round_num))
                transport.apply(stamp, *records.resumed.aggregates(round_num))
                on_progress("replay", round_num, replayed)
        transport.on_progress = on_progress  # from here on: a replay is not a round's "apply"
        records.run_rounds(server, transport, on_round or (lambda m: None), on_progress=on_progress)
        model = atomic_write(records.output / MODEL_FILE, transport.model_bytes())
    finally:
        transport.close()
    return records.finish([model])


def _transport(
    config: RunConfig, task: Task | None, on_progress: Progress
) -> InProcessTransport | RayTransport:
    """Clients as objects in this process, or as Ray actors."""
    if config.transport == "ray":
        from secagg.transport.ray import RayTransport

        return RayTransport(config, task)
    return simulation(config, task_for(config, task), on_progress)
