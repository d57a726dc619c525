"""How a run is labelled where people read it: the console's headline, MLflow's run name, tags,
parameters and description, and the metrics it logs each round."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import TYPE_CHECKING, Any

from secagg import keys as keyfiles
from secagg.config import RunConfig
from secagg.crypto.packing import packing_for
from secagg.rounds import RoundMetrics

if TYPE_CHECKING:
    from secagg.records import RunResult


def headline(name: str, value: float) -> str:
    """A headline metric as the console shows it: ``macro_f1 0.7100``, or that no site
    reported it."""
    return f"{name} {value:.4f}" if math.isfinite(value) else f"{name} not reported"


def mlflow_params(config: RunConfig, num_parameters: int | None) -> dict[str, Any]:
    params = config.to_dict()
    if num_parameters is not None:
        params["num_parameters"] = num_parameters
    if config.he:
        manifest = keyfiles.read_manifest(config.keys_dir)
        params["key_fingerprint"] = manifest["fingerprint"]
        params["ckks"] = json.dumps(manifest["params"])
        params["he_packing"] = config.precision  # he_precision with auto resolved
    return params


def mode(config: RunConfig) -> str:
    """What the run is, in one word: ``he``, ``plain`` or (float64 updates) ``plain64``."""
    if config.he:
        return "he"
    return "plain" if config.plain_precision == "float32" else "plain64"


def run_name(config: RunConfig, started_at: float) -> str:
    """``he-digits-8c-1122-153012``: what differs between runs first, as MLflow's runs table
    cuts names at about 25 characters; then the start time (month, day, time)."""
    stamp = time.strftime("%m%d-%H%M%S", time.localtime(started_at))
    return f"{mode(config)}-{config.job_name}-{config.clients}c-{stamp}"


def tags_for(config: RunConfig) -> dict[str, str]:
    """Tags to filter and group runs by in MLflow's runs table."""
    tags = {
        "he": str(config.he).lower(),
        "mode": mode(config),
        "job": config.job_name,
        "clients": str(config.clients),
        "metric": config.headline,
    }
    if config.dp:  # the budget (or the noise) the run was made with, to group runs by
        tags["dp_epsilon"] = f"{config.dp_epsilon:g}" if config.dp_epsilon else "none"
    if config.task is None:  # the built-in task's dataset and model; a user's task names itself
        return {**tags, "dataset": config.dataset, "model": config.model}
    return {**tags, "task": config.task}


def description(result: RunResult) -> str:
    """The MLflow run's description (markdown): what ran, and its bytes per parameter once a
    round has measured them."""
    config = result.config
    if config.he:
        packing = packing_for(config.per_round, config.precision)
        codec = (
            f"CKKS, packed ({config.precision}): {packing.values_per_slot} x "
            f"{packing.digit_bits}-bit values per slot"
        )
    else:
        codec = f"plaintext {config.plain_precision}"
    parameters = (
        f"{result.num_parameters:,} parameters"
        if result.num_parameters
        else "parameters: not known until a site joins"
    )
    if result.model_class:
        parameters = f"{result.model_class}, {parameters}"
    better = "higher" if config.headline_higher else "lower"
    lines = [
        f"**{'HE secure aggregation' if config.he else 'Plaintext FedAvg'}**, "
        f"job `{config.job_name}`",
        "",
    ]
    if config.task is None:
        lines += [
            f"- model: {config.model} ({parameters})",
            f"- dataset: {config.dataset}, Dirichlet alpha {config.alpha}, seed {config.seed}",
        ]
    else:
        settings = ", ".join(f"{k}={v!r}" for k, v in config.task_settings.items()) or "none"
        lines += [
            f"- task: `{config.task}` ({parameters}), seed {config.seed}",
            f"- task settings: {settings}",
        ]
    lines += [
        f"- clients: {config.clients}, rounds: {config.rounds}, "
        f"local epochs: {config.local_epochs}",
        f"- metric: {config.headline} ({better} is better)",
        f"- codec: {codec}",
    ]
    if config.dp:
        spent = result.rounds[-1].epsilon if result.rounds else 0.0
        budget = f", budget {config.dp_epsilon:g}" if config.dp_epsilon else ""
        clip = f"clip {config.dp_clip:g}"
        if config.dp_clip_quantile:
            clip += f" at first, adapted towards the {config.dp_clip_quantile:g} quantile"
        lines.append(
            f"- differential privacy: epsilon {spent:.2f} so far at delta {config.dp_delta:g}"
            f"{budget}; noise multiplier {config.noise_multiplier():.3f}, {clip}"
        )
    if result.failure:
        lines.append(f"- **failed**: {result.failure}")
    per_parameter = result.bytes_per_parameter
    if per_parameter is not None:
        up, down = per_parameter
        lines.append(f"- bytes per parameter, per client and round: {up:.2f} up, {down:.2f} down")
    return "\n".join(lines)


def tracked(metrics: RoundMetrics) -> dict[str, float]:
    """A round's metrics as MLflow series: every number, and each of the task's own metrics
    under its name (``task_<name>`` where that name is one of secagg's and means another
    thing); a value no site reported (NaN) is left out, never logged as nan."""
    values = dataclasses.asdict(metrics)
    values.pop("round")
    own: dict[str, float] = values.pop("metrics")
    for name, value in own.items():
        if name not in values:
            values[name] = value
        elif values[name] != value:
            values[f"task_{name}"] = value
    return {name: value for name, value in values.items() if math.isfinite(value)}
