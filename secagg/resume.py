"""Resuming an interrupted run: its saved settings, the changes it may take, and where it is."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secagg.config import RunConfig
from secagg.errors import ConfigError
from secagg.rounds import RoundMetrics
from secagg.server import load_checkpoint

#: settings a resumed run may change: what the rounds so far computed stays valid under them
#: (how many rounds the run has, and where and on what it trains); any other change would
#: make the rest of the run a different job
RESUMABLE = ("rounds", "device", "data_dir", "download")


@dataclass(frozen=True)
class ResumePlan:
    """How an interrupted run goes on: its saved config with the changes it may take."""

    #: the config the run continues with
    config: RunConfig
    #: rounds the run completed before
    completed: int
    #: each setting changed on resuming: (the run's value, the new one)
    changed: dict[str, tuple[Any, Any]]
    #: the last completed round's headline metric (NaN when not known)
    final: float

    @property
    def finished(self) -> bool:
        """True when the run has no round left to run."""
        return self.completed >= self.config.rounds


def plan_resume(resume_dir: str | Path, changes: Mapping[str, Any] = {}) -> ResumePlan:
    """The plan for resuming the run in ``resume_dir`` with ``changes`` (settings a user gave).

    Changes to the settings in ``RESUMABLE`` are applied (``rounds`` no lower than the rounds
    already completed; a DP run whose noise its ``dp_epsilon`` set keeps that noise, so its
    budget, spent, stops it); a change to any other setting is refused with a ConfigError naming it,
    since the rest of the run would not continue what the first rounds did.
    """
    checkpoint = load_checkpoint(resume_dir)
    saved = RunConfig(**{**checkpoint.state["config"], "output_dir": str(resume_dir)}).validate()
    completed = checkpoint.round_num
    changed = {
        name: (getattr(saved, name), value)
        for name, value in changes.items()
        if getattr(saved, name) != value
    }
    refuse_changes(
        changed, f"--resume continues {resume_dir} as it started", "drop that, or start a new run"
    )
    if "rounds" in changed and changed["rounds"][1] < completed:
        raise ConfigError(
            f"{resume_dir} has already completed {completed} rounds; "
            f"--rounds must be at least {completed}"
        )
    config = replace(saved, **{name: new for name, (_, new) in changed.items()})
    if "rounds" in changed and saved.dp and not saved.dp_noise:
        # The noise was calibrated to dp_epsilon over the run's rounds, and the rounds so far
        # added it: the rest add the same, so that epsilon is one mechanism's, and the budget
        # stops the run where it is spent.
        config = replace(config, dp_noise=saved.noise_multiplier())
    config = config.validate()
    history = checkpoint.state.get("history", [])
    last = RoundMetrics.from_dict(history[-1]).value(config.headline) if history else math.nan
    return ResumePlan(config, completed, changed, last)


def refuse_changes(changed: Mapping[str, tuple[Any, Any]], run: str, remedy: str) -> None:
    """Refuse (ConfigError) the ``changed`` settings (name: the run's value, the new one)
    outside ``RESUMABLE``, each as the flag that sets it: "``run``; ``--lr 0.1`` (the run
    has 0.05) would make it another job: ``remedy``"."""
    refused = [name for name in changed if name not in RESUMABLE]
    if refused:
        what = ", ".join(
            f"{_flag(name, changed[name][1])} (the run has {changed[name][0]})" for name in refused
        )
        raise ConfigError(f"{run}; {what} would make it another job: {remedy}")


_FLAGS = {"keys_dir": "--keys", "output_dir": "--output"}


def _flag(name: str, value: Any) -> str:
    """A setting as the flag that sets it: ``--lr 0.1``, ``--he``, ``--no-tracking``."""
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value}"
