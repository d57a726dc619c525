"""The aggregation server: adds payloads it cannot read, and checkpoints the encrypted sum.

It is built from a server-side cipher only; the CKKS one refuses a context with a secret key, so
the server can never decrypt an update or the global model.

Clients send updates relative to the global model, so the encrypted global model is the chain
of every round's encrypted aggregates: all clients start from the same seeded model, and the
global model after round R is that model plus R aggregated updates, applied in order. Each
round's aggregate is written to ``aggregates/round-NNNN.enc`` for an HE run (and the summed
scales that decode it to ``round-NNNN.scales.enc``), or ``round-NNNN.bin`` for a plaintext run,
whose aggregates are not encrypted, through a temp file and a rename before ``state.json``
records the round; ``secagg run --resume`` and a rejoining client replay the chain and reach the
global model bit for bit. The chain grows by about 2.6 bytes per parameter per round (HE,
``standard``; 3.9 with ``fine``), plus a 32-byte seed per contributor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secagg.crypto import MaskRoster, Reveal, ServerCipher, Stamp, contributors
from secagg.errors import CheckpointError, PayloadError
from secagg.files import atomic_write, atomic_write_json

AGGREGATES_DIR = "aggregates"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class Checkpoint:
    """The last completed round, its state, and the chain of aggregates up to it."""

    round_num: int
    state: dict[str, Any]
    workdir: Path

    @property
    def job_id(self) -> bytes:
        """The run's id, which every payload of the run carries."""
        return bytes.fromhex(str(self.state["job_id"]))

    def aggregates(self, round_num: int) -> tuple[bytes, bytes | None]:
        """The aggregate of ``round_num`` (1 to ``self.round_num``) and its summed scales."""
        update, scales = aggregate_paths(self.workdir, round_num)
        try:
            return update.read_bytes(), scales.read_bytes() if scales.exists() else None
        except FileNotFoundError as err:
            raise CheckpointError(
                f"{update.with_suffix('')}.enc (or .bin) is missing: the checkpoint chain is "
                "broken, so the global model cannot be rebuilt; start a new run"
            ) from err

    def attempt(self, round_num: int) -> bytes:
        """The attempt that made ``round_num``'s aggregates (empty: an unmasked round)."""
        return attempt_of(self.workdir, round_num)


def attempt_of(workdir: Path, round_num: int) -> bytes:
    """The attempt nonce a masked round's aggregates were made under, beside them in the
    chain (empty when there is none: unmasked rounds)."""
    path = _paths(workdir, round_num, ATTEMPT_SUFFIX)[0]
    return path.read_bytes() if path.exists() else b""


#: file suffix of the attempt a network server is running (its nonce and keyed sites), so that
#: a server restarted mid-round resumes it: sites that sent their update under it never send
#: it under another attempt (``crypto.masking``), so only the same attempt can finish the round
RUNNING_SUFFIX = ".running"


@dataclass(frozen=True)
class RunningAttempt:
    """The try of a masked round a network server handed its sites: its nonce, and the sites
    it handed mask keys."""

    nonce: bytes
    sites: frozenset[int]


def save_running(workdir: Path, job: bytes, round_num: int, attempt: RunningAttempt) -> None:
    """Record the attempt before any site hears of it (the aggregates folder, 0600)."""
    record = {"job": job.hex(), "nonce": attempt.nonce.hex(), "sites": sorted(attempt.sites)}
    path = _paths(workdir, round_num, RUNNING_SUFFIX)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record, mode=0o600)


def running_attempt(workdir: Path, job: bytes, round_num: int) -> RunningAttempt | None:
    """The attempt of ``round_num`` a server of ``job`` was running when it stopped (None: none
    recorded, another job's, or a damaged record, which only costs a fresh attempt)."""
    path = _paths(workdir, round_num, RUNNING_SUFFIX)[0]
    try:
        record = json.loads(path.read_text())
        if record["job"] != job.hex():
            return None
        sites = frozenset(int(site) for site in record["sites"])
        return RunningAttempt(bytes.fromhex(record["nonce"]), sites)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finish_running(workdir: Path, round_num: int) -> None:
    """The round's aggregate is checkpointed: no attempt of it is running any more."""
    _paths(workdir, round_num, RUNNING_SUFFIX)[0].unlink(missing_ok=True)


#: file suffix of an aggregate, by whether it is encrypted
ENCRYPTED_SUFFIX, PLAIN_SUFFIX = ".enc", ".bin"
#: file suffix of a masked round's attempt nonce, which its aggregates are checked under
ATTEMPT_SUFFIX = ".attempt"


def aggregate_paths(workdir: Path, round_num: int) -> tuple[Path, Path]:
    """Where the chain holds a round's aggregate and its summed scales: ``.bin`` files when a
    plaintext run wrote them, ``.enc`` otherwise (HE runs, and plaintext runs of secagg
    versions that named every aggregate ``.enc``, which still resume)."""
    plain = _paths(workdir, round_num, PLAIN_SUFFIX)
    return plain if plain[0].exists() else _paths(workdir, round_num, ENCRYPTED_SUFFIX)


def _paths(workdir: Path, round_num: int, suffix: str) -> tuple[Path, Path]:
    stem = workdir / AGGREGATES_DIR / f"round-{round_num:04d}"
    return stem.with_name(stem.name + suffix), stem.with_name(f"{stem.name}.scales{suffix}")


@dataclass(frozen=True)
class Summed:
    """An aggregate, and the seconds the server spent adding each payload of it, in arrival
    order (the last one includes serializing the total), and checking each one. A network
    server checks each upload on the thread that receives it, as it arrives, so checks run
    side by side; only adding is one after another."""

    payload: bytes
    seconds: list[float]
    checks: list[float] = field(default_factory=list)


class Server:
    """Holds a server-side cipher (no secret key) and the run folder it checkpoints into."""

    def __init__(
        self, cipher: ServerCipher, workdir: str | Path | None = None, masking: bool = False
    ) -> None:
        self.cipher = cipher
        self.workdir = None if workdir is None else Path(workdir)
        #: the clients mask pairwise (``crypto.masking``): every phase's sum is unmasked with
        #: its contributors' reveals before it decrypts
        self.masking = masking
        #: (job, round, phase) whose sum was corrected, and for which dropped clients
        self._closed: dict[tuple[bytes, int, int], tuple[int, ...]] = {}

    def begin(self, round_stamp: Stamp) -> None:
        """A round starts, or starts again: its clients mask afresh (a new attempt's masks), so
        what an earlier attempt closed no longer holds."""
        for key in [k for k in self._closed if k[:2] == (round_stamp.job, round_stamp.round_num)]:
            del self._closed[key]

    def sum(
        self,
        payloads: Iterable[bytes],
        round_stamp: Stamp,
        values: int,
        allowed: frozenset[int] | None = None,
    ) -> Summed:
        """Add a round's payloads as they arrive, each of exactly ``values`` values (the job's
        model says how many, never a payload), only ``allowed`` senders' when given."""
        closed = self._closed.get((round_stamp.job, round_stamp.round_num, round_stamp.phase))
        if closed is not None:
            # The dropped clients' pairs were removed: adding their payloads now would leave
            # only their self-masks on them.
            raise PayloadError(
                f"round {round_stamp.round_num}'s sum was unmasked without client(s) "
                f"{list(closed)}; a late update is never added",
                "late-update",
            )
        timed = _Timed(payloads, lambda payload: self.cipher.check(payload, round_stamp, values))
        summed = self.cipher.sum(timed, round_stamp, allowed, values)
        timed.close()
        return Summed(summed, timed.each, timed.checks)

    def correct(
        self,
        summed: Summed,
        reveals: Sequence[Reveal],
        stamp: Stamp,
        masks: MaskRoster,
    ) -> Summed:
        """Unmask a phase's sum with its contributors' reveals (their self-mask keys, their
        shares of the other survivors' keys and of the lost positions' mask keys), and close
        the phase: nothing more is added to it. ``masks``: the attempt as its positions
        advertised it (their keys, commitments, and whom each masks with)."""
        start = time.perf_counter()
        dropped = tuple(sorted(masks.keyed - set(contributors(summed.payload))))
        self._closed[(stamp.job, stamp.round_num, stamp.phase)] = dropped
        payload = self.cipher.corrected(summed.payload, reveals, stamp, masks)
        return Summed(
            payload,
            [*summed.seconds[:-1], summed.seconds[-1] + time.perf_counter() - start],
            summed.checks,
        )

    def checkpoint(
        self,
        round_num: int,
        summed: bytes,
        scales: bytes | None,
        state: dict[str, object],
        *,
        encrypted: bool,
        attempt: bytes = b"",
    ) -> None:
        """Persist the round's aggregates (named ``.enc`` only when ``encrypted``) and the
        attempt that made them, then the run state after ``round_num``."""
        if self.workdir is None:
            return
        suffix = ENCRYPTED_SUFFIX if encrypted else PLAIN_SUFFIX
        update_path, scales_path = _paths(self.workdir, round_num, suffix)
        if attempt:
            atomic_write(_paths(self.workdir, round_num, ATTEMPT_SUFFIX)[0], attempt, mode=0o600)
        if scales is not None:
            atomic_write(scales_path, scales, mode=0o600)
        atomic_write(update_path, summed, mode=0o600)
        self.save_state({**state, "round": round_num})

    def save_state(self, state: dict[str, object]) -> None:
        """Rewrite ``state.json`` (its ``round`` names the last checkpointed round)."""
        if self.workdir is not None:
            atomic_write_json(self.workdir / STATE_FILE, state)


def load_checkpoint(workdir: str | Path) -> Checkpoint:
    """The last completed round of an interrupted run in ``workdir``."""
    workdir = Path(workdir)
    try:
        state = json.loads((workdir / STATE_FILE).read_text())
        checkpoint = Checkpoint(int(state["round"]), state, workdir)
        checkpoint.job_id  # noqa: B018  (checked here, so a damaged file fails early)
        return checkpoint
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{workdir}/ has no checkpoint to resume (no completed round); start a new run"
        ) from err
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{workdir}/{STATE_FILE} is damaged: {err}") from err


class _Timed:
    """Wraps the arrival stream to time the server's work on each payload, not its waiting:
    checking it as it arrives (``check``; a payload a network server checked on arrival is
    not checked again), then adding it."""

    def __init__(self, payloads: Iterable[bytes], check: Callable[[bytes], object]) -> None:
        self._it = iter(payloads)
        self._check = check
        self._handed: float | None = None
        self.each: list[float] = []
        self.checks: list[float] = []

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> bytes:
        self.close()
        item = next(self._it)
        start = time.perf_counter()
        self._check(item)
        self._handed = time.perf_counter()
        self.checks.append(self._handed - start)
        return item

    def close(self) -> None:
        """Charge the time since the last payload was handed over to that payload."""
        if self._handed is not None:
            self.each.append(time.perf_counter() - self._handed)
            self._handed = None
