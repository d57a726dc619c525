"""secagg: federated learning with homomorphic-encryption secure aggregation.

One round, in the order the data moves (see ``secagg.rounds``): every client trains, flattens
its model, weights it by its sample count and encrypts it; the server adds the ciphertexts
without holding the secret key; every client decrypts the sum, divides by the total weight and
loads the new global model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from secagg.config import RunConfig
from secagg.task import EvalResult, RoundContext, Site, Task, TrainResult, load_task

if TYPE_CHECKING:
    from collections.abc import Callable

    from secagg.records import RunResult
    from secagg.rounds import RoundMetrics

__version__ = "0.1.0"
__all__ = [
    "EvalResult",
    "RoundContext",
    "RunConfig",
    "Site",
    "Task",
    "TrainResult",
    "load_task",
    "run",
]


def run(
    task: Task | str | None = None,
    config: RunConfig | None = None,
    *,
    resume: str | Path | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
) -> RunResult:
    """Run a federated job with ``task`` (a Task, or its import path ``package.module:Class``;
    None: the one ``config`` names, or the built-in) and return what ``secagg run`` writes to
    results.json. ``resume`` continues the interrupted run in that folder.

    With ``config.transport == "grpc"`` every site is a process of its own, which must import
    the task: give it by import path.
    """
    from dataclasses import replace

    config = config or RunConfig()
    if isinstance(task, str):
        config, task = replace(config, task=task), None
    config.validate()
    if config.transport == "grpc":
        if task is not None:
            from secagg.errors import ConfigError

            raise ConfigError(
                "transport grpc starts one process per site, which cannot be handed a "
                f"{type(task).__name__} object; pass the task's import path "
                "('package.module:Class') instead"
            )
        from secagg.deploy import run_local

        return run_local(config)
    from secagg.job import run_job

    return run_job(config, task=task, resume_dir=resume, on_round=on_round)
