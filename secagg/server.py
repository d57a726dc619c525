"""The aggregation server: adds payloads it cannot read, and checkpoints the encrypted sum.

It is built from a server-side cipher only; the CKKS one refuses a context with a secret key, so
the server can never decrypt an update or the global model. The encrypted global model (the
last round's sum) is written each round through a temp file and a rename, which is what
``secagg run --resume`` and a rejoining client start from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secagg.crypto import ServerCipher
from secagg.errors import CheckpointError
from secagg.files import atomic_write, atomic_write_json

CHECKPOINT_FILE = "global.enc"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class Checkpoint:
    round_num: int
    payload: bytes
    state: dict[str, Any]


class Server:
    def __init__(self, cipher: ServerCipher, workdir: str | Path | None = None) -> None:
        self.cipher = cipher
        self.workdir = None if workdir is None else Path(workdir)
        self.last_sum_seconds = 0.0

    def sum(self, payloads: Iterable[bytes]) -> bytes:
        """Add payloads as they arrive; the time spent adding is kept in ``last_sum_seconds``."""
        timed = _Timed(payloads)
        start = time.perf_counter()
        summed = self.cipher.sum(timed)
        self.last_sum_seconds = time.perf_counter() - start - timed.waiting
        return summed

    def checkpoint(self, round_num: int, summed: bytes, state: dict[str, object]) -> None:
        """Persist the encrypted global model and the run state after ``round_num``."""
        if self.workdir is None:
            return
        atomic_write(self.workdir / CHECKPOINT_FILE, summed, mode=0o600)
        atomic_write_json(self.workdir / STATE_FILE, {**state, "round": round_num})


def load_checkpoint(workdir: str | Path) -> Checkpoint:
    """The last completed round of an interrupted run in ``workdir``."""
    workdir = Path(workdir)
    try:
        state = json.loads((workdir / STATE_FILE).read_text())
        payload = (workdir / CHECKPOINT_FILE).read_bytes()
        return Checkpoint(int(state["round"]), payload, state)
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{workdir}/ has no checkpoint to resume (no completed round); start a new run"
        ) from err
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{workdir}/{STATE_FILE} is damaged: {err}") from err


class _Timed:
    """Wraps the arrival stream so that time spent waiting for clients is not counted as summing."""

    def __init__(self, payloads: Iterable[bytes]) -> None:
        self._it = iter(payloads)
        self.waiting = 0.0

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> bytes:
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.waiting += time.perf_counter() - start
