"""CKKS through TenSEAL: the only module that imports tenseal.

Clients weight their own update before encrypting, so the server only adds ciphertexts
(multiplicative depth zero): it needs no relinearization, rotation or plaintext multiply, and
one data prime is enough. Every party that encrypts also holds the secret key, so clients
encrypt with it (symmetric CKKS): that is twice as fast as public-key encryption and leaves a
seventh of the noise, which is what lets the ``packed`` codec carry three values per slot. The
server's context holds the parameters and no key at all.

Two codecs share this module:

- ``float``: one value per slot at the keys' scale (2**30), about 32 bytes per value.
- ``packed``: integers quantized by the client, three per slot (see ``packing``), exact after
  summing, about 10.7 bytes per value.

Vectors are chunked to the slot count here, because TenSEAL would otherwise split them itself
with a warning per call. TenSEAL objects do not pickle and are not safe to share, so everything
that leaves this module is bytes. TenSEAL holds the GIL, so encryption and decryption are
spread over worker processes (``SECAGG_WORKERS`` in all, default one per CPU core).
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from secagg.config import CkksParams
from secagg.crypto import FLOAT_TAIL, Update, from_float_vector, to_float_vector
from secagg.crypto.envelope import Envelope, check_round, from_bytes
from secagg.crypto.packing import PackedParams
from secagg.errors import ConfigError, KeyFileError, PayloadError
from secagg.keys import Keys

CODEC_IDS = {"float": 1, "packed": 2}
PACKED = PackedParams()
# Bound on how large a summed float value may grow, so a sum can never wrap around the modulus
# silently: |value| * 2**scale_bits must stay far below the data prime (2**59 for 60 bits).
_HEADROOM_BITS = 3
#: The packed codec's two whole-slot tail integers: weight in units of 2**-32, clipped count.
_PACKED_TAIL = 2
_WEIGHT_UNIT = 2.0**32
# Fewer ciphertexts than this per worker are encrypted in-process: the pool would not pay.
_MIN_PER_WORKER = 8


def make_contexts(params: CkksParams) -> tuple[bytes, bytes]:
    """Generate a key; return (client context with the secret key, server context without).

    The server's context holds the encryption parameters only: it can load and add
    ciphertexts, and neither decrypt nor encrypt.
    """
    try:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
    except ValueError as err:
        raise KeyFileError(f"TenSEAL refused the CKKS parameters: {err}") from err
    context.global_scale = 2.0**params.global_scale_bits
    secret = context.serialize(save_secret_key=True)
    public = context.serialize(
        save_public_key=False,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    return secret, public


def _load_context(data: bytes) -> ts.Context:
    try:
        return ts.context_from(data)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise KeyFileError(f"not a TenSEAL CKKS context ({err}); run 'secagg keygen'") from err


def context_is_private(data: bytes) -> bool:
    """True when serialized context bytes hold a secret key."""
    return bool(_load_context(data).is_private())


def max_value(params: CkksParams) -> float:
    """Largest magnitude a (summed) float-codec value may reach without wrapping the modulus."""
    data_bits = params.coeff_mod_bit_sizes[0]
    return 2.0 ** (data_bits - params.global_scale_bits - _HEADROOM_BITS)


class _CkksBase:
    def __init__(self, keys: Keys, codec: str) -> None:
        if codec not in CODEC_IDS:
            raise ConfigError(f"unknown codec {codec!r}; use one of {', '.join(CODEC_IDS)}")
        self.name = f"ckks-{codec}"
        self.codec = codec
        self._codec_id = CODEC_IDS[codec]
        self._context_bytes = keys.context
        self._context = _load_context(keys.context)
        self._fingerprint = keys.fingerprint
        self._params = keys.params
        if codec == "packed":
            PACKED.check(keys.params.coeff_mod_bit_sizes[0], keys.params.poly_modulus_degree)
        # A ciphertext is two polynomials of N coefficients, 8 bytes per prime; allow slack.
        primes = len(keys.params.coeff_mod_bit_sizes)
        self._max_blob = 2 * keys.params.poly_modulus_degree * 8 * primes + 65536

    def _slots_for(self, length: int) -> int:
        if self.codec == "packed":
            return PACKED.slots_for(length, _PACKED_TAIL)
        return length + FLOAT_TAIL

    def _open(self, payload: bytes, round_num: int | None) -> Envelope:
        envelope = from_bytes(
            payload, codec=self._codec_id, fingerprint=self._fingerprint, max_blob=self._max_blob
        )
        check_round(envelope, round_num)
        expected = math.ceil(self._slots_for(envelope.length) / self._params.slots)
        if len(envelope.blobs) != expected:
            raise PayloadError(
                f"payload has {len(envelope.blobs)} ciphertexts for {envelope.length} values "
                f"(expected {expected})"
            )
        return envelope

    def _vector(self, blob: bytes | memoryview) -> ts.CKKSVector:
        try:
            return ts.ckks_vector_from(self._context, bytes(blob))
        except Exception as err:
            raise PayloadError(f"ciphertext does not load under these keys: {err}") from err


class CkksClient(_CkksBase):
    """Client side: encrypts and decrypts; needs the secret context.

    ``last_seconds`` splits the last ``encrypt`` into encoding plus encryption, and the
    serialization of the envelope.
    """

    def __init__(self, keys: Keys, codec: str = "packed") -> None:
        super().__init__(keys, codec)
        self.last_seconds: dict[str, float] = {}
        if not self._context.is_private():
            raise KeyFileError(
                "a client needs the secret context (keys/client.ctx), "
                "but was given a public one (server.ctx)"
            )
        self._pool = _pool_for(self._context_bytes)
        self.value_bound = PACKED.value_bound(PACKED.max_clients) if codec == "packed" else None

    def encrypt(self, update: Update, round_num: int = 0) -> bytes:
        start_time = time.perf_counter()
        if self.codec == "packed":
            weight = np.rint(update.weight * _WEIGHT_UNIT)
            slots = PACKED.pack(update.values, np.array([weight, update.clipped]))
            scale = 2.0**PACKED.scale_bits
        else:
            slots = self._check_float(to_float_vector(update))
            scale = 2.0**self._params.global_scale_bits
        blobs = self._pool.encrypt(self._context, slots, self._params.slots, scale)
        encrypted = time.perf_counter()
        payload = Envelope(
            self._codec_id, self._fingerprint, round_num, update.values.size, tuple(blobs)
        )
        data = payload.to_bytes()
        self.last_seconds = {
            "encrypt": encrypted - start_time,
            "serialize": time.perf_counter() - encrypted,
        }
        return data

    def decrypt(self, payload: bytes, round_num: int | None = None) -> Update:
        envelope = self._open(payload, round_num)
        n_slots = self._slots_for(envelope.length)
        try:
            slots = self._pool.decrypt(self._context, envelope.blobs, n_slots, self._params.slots)
        except PayloadError:
            raise
        except Exception as err:
            raise PayloadError(f"ciphertext does not decrypt under these keys: {err}") from err
        if self.codec == "packed":
            values, tail = PACKED.unpack(slots, envelope.length, _PACKED_TAIL)
            return Update(values, float(tail[0] / _WEIGHT_UNIT), int(tail[1]))
        update = from_float_vector(slots)
        if update.values.size != envelope.length:
            raise PayloadError("payload length does not match its values")
        return update

    def _check_float(self, vector: np.ndarray) -> np.ndarray:
        limit = max_value(self._params)
        if vector.size and not np.isfinite(vector).all():
            raise PayloadError("update has NaN or infinite values; training diverged")
        if vector.size and np.abs(vector).max() > limit:
            raise PayloadError(
                f"update value {np.abs(vector).max():.3g} exceeds the CKKS range {limit:.3g}; "
                "lower --lr or make keys with fewer scale bits"
            )
        return vector


class CkksServer(_CkksBase):
    """Server side: adds ciphertexts; refuses any context that holds a secret key."""

    def __init__(self, keys: Keys, codec: str = "packed") -> None:
        super().__init__(keys, codec)
        if self._context.is_private():
            raise KeyFileError(
                "the server was given a context with the secret key; it must only ever load "
                "the public context (keys/server.ctx)"
            )

    def sum(self, payloads: Iterable[bytes]) -> bytes:
        """Add payloads as they arrive: holds the running sum and one payload, never all."""
        totals: list[ts.CKKSVector] = []
        first: Envelope | None = None
        count = 0
        for payload in payloads:
            envelope = self._open(payload, first.round_num if first else None)
            del payload
            count += 1
            if self.codec == "packed" and count > PACKED.max_clients:
                raise PayloadError(
                    f"the packed codec sums at most {PACKED.max_clients} clients per round; "
                    "more could overflow its headroom"
                )
            if first is None:
                first = envelope
                totals = [self._vector(blob) for blob in envelope.blobs]
                continue
            if envelope.length != first.length:
                raise PayloadError(
                    f"payload has {envelope.length} values, the round has {first.length}"
                )
            for total, blob in zip(totals, envelope.blobs, strict=True):
                try:
                    total += self._vector(blob)
                except ValueError as err:
                    raise PayloadError(f"ciphertexts cannot be added: {err}") from err
            del envelope
        if first is None:
            raise PayloadError("no payloads to sum")
        blobs: list[bytes | memoryview] = []
        totals.reverse()
        while totals:  # serialize and free one running total at a time
            blobs.append(totals.pop().serialize())
        return Envelope(
            self._codec_id, self._fingerprint, first.round_num, first.length, tuple(blobs)
        ).to_bytes()


# --- encryption and decryption across processes ----------------------------------------------


def encrypt_chunks(context: ts.Context, slots: np.ndarray, size: int, scale: float) -> list[bytes]:
    """Encrypt ``slots`` in ciphertexts of ``size`` slots; return their serialized bytes."""
    return [
        ts.ckks_vector(context, slots[start : start + size], scale).serialize()
        for start in range(0, slots.size, size)
    ]


def decrypt_chunks(context: ts.Context, blobs: Sequence[bytes | memoryview]) -> np.ndarray:
    """Decrypt serialized ciphertexts into one float64 array."""
    parts = [np.asarray(ts.ckks_vector_from(context, bytes(blob)).decrypt()) for blob in blobs]
    return np.concatenate(parts) if parts else np.empty(0)


def load_context(data: bytes) -> ts.Context:
    return _load_context(data)


class _Pool:
    """Worker processes that each hold the client context; work is split by ciphertext.

    Workers are plain subprocesses (``python -m secagg.crypto.worker``) fed over pipes, not
    ``multiprocessing``: they never import the user's main script, and a worker that dies
    (TenSEAL can crash on bytes it does not expect) becomes a named error, not a dead client.
    With more than one worker the calling process does no TenSEAL work itself: TenSEAL holds
    the GIL, and a client encrypting in a background thread must not stall the thread that
    trains the next model. ``SECAGG_WORKERS=1`` runs everything in-process.
    """

    def __init__(self, context: bytes, workers: int) -> None:
        self.workers: list[subprocess.Popen[bytes]] = []
        if workers <= 1:
            return
        # The worker imports this very package, wherever it was imported from.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        for _ in range(workers):
            proc = subprocess.Popen(
                [sys.executable, "-m", "secagg.crypto.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": path},
            )
            self._send(proc, context)
            self.workers.append(proc)

    def _batches(self, count: int) -> list[tuple[int, int]]:
        parts = max(1, min(len(self.workers), count // _MIN_PER_WORKER))
        bounds = np.linspace(0, count, parts + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def encrypt(
        self, context: ts.Context, slots: np.ndarray, size: int, scale: float
    ) -> list[bytes]:
        count = math.ceil(slots.size / size)
        if not self.workers or count < _MIN_PER_WORKER:
            return encrypt_chunks(context, slots, size, scale)
        batches = self._batches(count)
        for proc, (a, b) in zip(self.workers, batches, strict=False):
            self._send(proc, ("encrypt", slots[a * size : b * size], size, scale))
        blobs: list[bytes] = []
        for proc, _ in zip(self.workers, batches, strict=False):
            blobs.extend(self._receive(proc))
        return blobs

    def decrypt(
        self, context: ts.Context, blobs: Sequence[bytes | memoryview], n_slots: int, size: int
    ) -> np.ndarray:
        if not self.workers or len(blobs) < _MIN_PER_WORKER:
            out = decrypt_chunks(context, blobs)
        else:
            batches = self._batches(len(blobs))
            for proc, (a, b) in zip(self.workers, batches, strict=False):
                self._send(proc, ("decrypt", [bytes(blob) for blob in blobs[a:b]]))
            out = np.concatenate(
                [self._receive(proc) for proc, _ in zip(self.workers, batches, strict=False)]
            )
        if out.size != n_slots:
            raise PayloadError("the ciphertexts hold a different number of values than declared")
        return out

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], message: object) -> None:
        assert proc.stdin is not None
        try:
            pickle.dump(message, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise PayloadError(
                f"a CKKS worker process is gone ({err}); restart the client"
            ) from err

    @staticmethod
    def _receive(proc: subprocess.Popen[bytes]) -> Any:
        assert proc.stdout is not None
        try:
            result = pickle.load(proc.stdout)
        except EOFError as err:
            code = proc.wait()
            raise PayloadError(
                f"a CKKS worker process died (exit code {code}) on this payload"
            ) from err
        if isinstance(result, WorkerFailure):
            raise PayloadError(f"ciphertext could not be processed: {result.message}")
        return result

    def close(self) -> None:
        for proc in self.workers:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.workers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.workers = []


class WorkerFailure:
    """What a worker sends back instead of a result when an operation raised."""

    def __init__(self, message: str) -> None:
        self.message = message


_POOLS: dict[bytes, _Pool] = {}


def worker_count() -> int:
    """Processes a client spreads CKKS work over: ``SECAGG_WORKERS``, default one per core."""
    raw = os.environ.get("SECAGG_WORKERS", "")
    try:
        return max(1, int(raw)) if raw else max(1, os.cpu_count() or 1)
    except ValueError as err:
        raise ConfigError(f"SECAGG_WORKERS={raw!r} is not a number of processes") from err


def worker_pids() -> list[int]:
    """Process ids of every live CKKS worker (for benchmarks that count their CPU time)."""
    return [proc.pid for pool in _POOLS.values() for proc in pool.workers]


def _pool_for(context: bytes) -> _Pool:
    """One pool per process and key: every in-process client shares it."""
    import hashlib

    key = hashlib.sha256(context).digest()
    if key not in _POOLS:
        _POOLS[key] = _Pool(context, worker_count())
    return _POOLS[key]


@atexit.register
def close_pools() -> None:
    """Stop every worker process (a new client cipher starts them again)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
