"""The client side of CKKS, through TenSEAL: the only module that imports tenseal.

Clients weight their own update before encrypting, so the server only adds ciphertexts
(multiplicative depth zero) and one 60-bit data prime is enough. Every party that encrypts
also holds the secret key, so clients encrypt with it (symmetric CKKS): twice as fast as
public-key encryption, with a seventh of the noise, which is what lets the packed codec carry
three quantized values per slot (``packing``). Decryptions are exact integers, so what a
client publishes (the global model, checkpoints, metrics) carries no key-dependent noise.

Ciphertexts leave this module as raw coefficients (``seal_format``): TenSEAL's own bytes never
travel, and TenSEAL only ever loads bytes this module rebuilt from checked coefficients. Only
``c0`` travels: each ciphertext's uniformly random ``c1`` is re-drawn from a seed the payload
carries (``seeded``), and an aggregate's ``c1`` is rebuilt from its contributors' seeds.
Vectors are chunked to the slot count here, because TenSEAL would otherwise split them itself
with a warning per call. TenSEAL holds the GIL, so encryption and decryption are spread over
worker processes (``SECAGG_WORKERS`` in all, default one per CPU core).
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from secagg.crypto import envelope, integrity, ledger, seal_format, seeded
from secagg.crypto.ckks_server import TAIL, blobs_for, codec_for, open_payload
from secagg.crypto.envelope import AGGREGATE, CORRECTION, UPDATE, Stamp
from secagg.crypto.ledger import Aggregate, Update
from secagg.crypto.masking import Masker
from secagg.crypto.packing import PACKED, WIDE, packing_for
from secagg.crypto.params import CkksParams, Keys
from secagg.crypto.seal_format import CiphertextShape
from secagg.errors import ConfigError, KeyFileError, PayloadError

# Fewer ciphertexts than this per worker are handled in-process: the pool would not pay.
_MIN_PER_WORKER = 8


def make_contexts(params: CkksParams) -> tuple[bytes, bytes]:
    """Generate a key; return (client context with the secret key, server context without).

    The server's context holds the encryption parameters only: it can neither decrypt nor
    encrypt, and the server needs no more, since adding ciphertexts takes no key.
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
    secret = context.serialize(save_secret_key=True)
    public = context.serialize(
        save_public_key=False,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    if load_context(public).is_private() or not load_context(secret).is_private():
        raise KeyFileError("TenSEAL did not separate the secret key from the public context")
    return secret, public


def load_context(data: bytes) -> ts.Context:
    """A TenSEAL context from trusted local bytes (a key file checked against the manifest)."""
    try:
        return ts.context_from(data)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise KeyFileError(f"not a TenSEAL CKKS context ({err}); run 'secagg keygen'") from err


class CkksClient:
    """Client side: encrypts updates and decrypts aggregates; needs the secret context.

    ``last_seconds`` splits the last ``encrypt`` into packing plus encryption, and the
    serialization of the envelope.
    """

    name = "ckks-packed"

    def __init__(self, keys: Keys, masker: Masker | None = None) -> None:
        #: pairwise masks (``masking``): None sends ciphertexts any key holder can read
        self.masker = masker
        self._context = load_context(keys.context)
        if not self._context.is_private():
            raise KeyFileError(
                "a client needs the secret context (keys/client.ctx), "
                "but was given a public one (server.ctx)"
            )
        self.codec, self._shape = codec_for(keys)
        self._codecs = {p: codec_for(keys, p)[0] for p in (PACKED, WIDE)}
        self._secret = seeded.SecretKey(keys.context, self._shape)
        self._mac = integrity.MacKey(keys.context)
        self._pool = _pool_for(keys.context)
        #: the largest magnitude a summed integer may reach in a round of up to 128 clients
        #: (``sum_limit_for`` says it for any round)
        self.sum_limit: int = PACKED.sum_limit
        self.last_seconds: dict[str, float] = {}

    def sum_limit_for(self, stamp: Stamp) -> int:
        """The largest magnitude a summed integer of ``stamp``'s round may reach."""
        return packing_for(stamp.roster).sum_limit

    def codec_for_round(self, stamp: Stamp) -> envelope.Codec:
        """The envelope codec of ``stamp``'s round (its packing depends on the round's size)."""
        return self._codecs[packing_for(stamp.roster)]

    def encrypt(self, update: Update, stamp: Stamp) -> bytes:
        start = time.perf_counter()
        tally, tail = ledger.entries(update, stamp)
        digits = np.concatenate([update.values, tally])
        packing = packing_for(stamp.roster)
        # Packed first: it refuses what it cannot carry before the tag reads any of it.
        slots = packing.pack(digits, np.concatenate([tail, np.zeros(integrity.SLOTS)]))
        slots[-integrity.SLOTS :] = self._mac.seal(stamp, digits, tail)
        seed = seeded.fresh_seed()
        c0 = self._pool.encrypt(
            self._context, self._secret, slots, self._shape, seed, packing.scale_bits
        )
        count, size = blobs_for(self._shape, stamp.roster)(update.values.size)
        if self.masker is not None and self.masker.active(stamp):
            q, n = self._shape.modulus, self._shape.poly_modulus_degree
            seal_format.add_mod(c0, self.masker.mask(stamp, count, n, q), q)
        encrypted = time.perf_counter()
        codec = self.codec_for_round(stamp)
        payload = envelope.to_bytes(
            codec, UPDATE, stamp, update.values.size, count, size, [c0], seeds=(seed,)
        )
        self.last_seconds = {
            "encrypt": encrypted - start,
            "serialize": time.perf_counter() - encrypted,
        }
        return payload

    def correct(self, stamp: Stamp, dropped: tuple[int, ...], values: int) -> bytes:
        """A correction payload: ``c0`` words that remove this client's masks with the
        ``dropped`` clients from the sum of ``stamp``'s phase (of ``values`` values)."""
        if self.masker is None:
            raise PayloadError("this client does not mask; it has nothing to correct", "bad-plan")
        count, size = blobs_for(self._shape, stamp.roster)(values)
        q, n = self._shape.modulus, self._shape.poly_modulus_degree
        words = self.masker.correct(stamp, dropped, count, n, q)
        return envelope.to_bytes(
            self.codec_for_round(stamp),
            CORRECTION,
            stamp,
            values,
            count,
            size,
            [words],
            tuple(sorted(dropped)),
        )

    def decrypt(self, payload: bytes, stamp: Stamp) -> Aggregate:
        opened = open_payload(self.codec_for_round(stamp), self._shape, payload, stamp, AGGREGATE)
        if self.masker is not None:
            self.masker.check_late(stamp, opened.contributors)
        c0 = np.frombuffer(opened.body, dtype="<u8").reshape(
            opened.blob_count, self._shape.poly_modulus_degree
        )
        seal_format.check_coefficients(c0, self._shape.modulus)
        n, roster = opened.values, stamp.roster
        packing = packing_for(roster)
        n_slots = packing.slots_for(n + roster, TAIL)
        slots = self._pool.decrypt(
            self._context, c0, opened.seeds, n_slots, self._shape, packing.scale_bits
        )
        tolerance = packing.tolerance(self._shape.poly_modulus_degree, len(opened.contributors))
        try:
            digits, tail = packing.unpack(slots, n + roster, TAIL, tolerance)
        except PayloadError as err:
            if err.reason == "out-of-range":
                # A duplicated update overflows digits too: let the tally name it if it can.
                loose, _ = packing.unpack(slots, n + roster, TAIL, tolerance, check_range=False)
                ledger.check_tally(loose[n:], stamp, opened.contributors)
            raise
        return ledger.settle(
            digits[:n], digits[n:], tail, stamp, opened.contributors, mac=self._mac
        )


# --- encryption and decryption, in this process or across worker processes -------------------


def encrypt_chunks(
    context: ts.Context,
    secret: seeded.SecretKey,
    slots: np.ndarray,
    shape: CiphertextShape,
    scale: float,
    seed: bytes,
    start: int = 0,
) -> np.ndarray:
    """Encrypt ``slots`` in ciphertexts of N/2 slots, numbered from ``start`` in the payload;
    return their ``c0`` (count, N), each re-randomised to the ``c1`` that ``seed`` expands to."""
    size = shape.poly_modulus_degree // 2
    count = math.ceil(slots.size / size)
    out = np.empty((count, shape.poly_modulus_degree), dtype="<u8")
    for index in range(count):
        blob = ts.ckks_vector(context, slots[index * size : (index + 1) * size], scale).serialize()
        fresh = seal_format.from_tenseal(blob, shape)[0]
        out[index] = secret.reseed(fresh, seed, start + index)
    return out


def decrypt_chunks(
    context: ts.Context,
    c0: np.ndarray,
    seeds: tuple[bytes, ...],
    sizes: list[int],
    shape: CiphertextShape,
    start: int = 0,
    scale_bits: int = PACKED.scale_bits,
) -> np.ndarray:
    """Decrypt checked ``c0`` words (ciphertexts ``start ..`` of a sum), their ``c1`` the sum of
    what every contributor's seed expands to, into one float64 array of ``sum(sizes)`` slots."""
    scale = 2.0**scale_bits
    n = shape.poly_modulus_degree
    c1 = seeded.expand_sum(seeds, start, len(c0), n, shape.modulus)
    parts = []
    for first, second, size in zip(c0, c1, sizes, strict=True):
        words = np.stack([first, second])
        vector = ts.ckks_vector_from(context, seal_format.to_tenseal(words, size, scale, shape))
        parts.append(np.asarray(vector.decrypt(), dtype=np.float64))
    return np.concatenate(parts) if parts else np.empty(0)


def _chunk_sizes(n_slots: int, count: int, shape: CiphertextShape) -> list[int]:
    size = shape.poly_modulus_degree // 2
    if not (count - 1) * size < n_slots <= count * size:
        raise PayloadError("ciphertext count does not match the declared values", "malformed")
    return [size] * (count - 1) + [n_slots - (count - 1) * size]


class _Pool:
    """Worker processes that each hold the client context; work is split by ciphertext.

    Workers are plain subprocesses (``python -m secagg.crypto.worker``) fed over pipes, not
    ``multiprocessing``: they never import the user's main script, and a worker that dies
    becomes a named error, not a dead client. With more than one worker the calling process
    does no TenSEAL work itself: TenSEAL holds the GIL, and a client encrypting in a background
    thread must not stall the thread that trains the next model. ``SECAGG_WORKERS=1`` runs
    everything in-process.
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
        self,
        context: ts.Context,
        secret: seeded.SecretKey,
        slots: np.ndarray,
        shape: CiphertextShape,
        seed: bytes,
        scale_bits: int = PACKED.scale_bits,
    ) -> np.ndarray:
        scale = 2.0**scale_bits
        size = shape.poly_modulus_degree // 2
        count = math.ceil(slots.size / size)
        if not self.workers or count < 2 * _MIN_PER_WORKER:
            return encrypt_chunks(context, secret, slots, shape, scale, seed)
        batches = self._batches(count)
        for proc, (a, b) in zip(self.workers, batches, strict=False):
            self._send(proc, ("encrypt", slots[a * size : b * size], shape, scale, seed, a))
        parts = [self._receive(proc) for proc, _ in zip(self.workers, batches, strict=False)]
        return np.concatenate(parts)

    def decrypt(
        self,
        context: ts.Context,
        c0: np.ndarray,
        seeds: tuple[bytes, ...],
        n_slots: int,
        shape: CiphertextShape,
        scale_bits: int = PACKED.scale_bits,
    ) -> np.ndarray:
        sizes = _chunk_sizes(n_slots, len(c0), shape)
        if not self.workers or len(c0) < 2 * _MIN_PER_WORKER:
            return decrypt_chunks(context, c0, seeds, sizes, shape, 0, scale_bits)
        batches = self._batches(len(c0))
        for proc, (a, b) in zip(self.workers, batches, strict=False):
            self._send(proc, ("decrypt", c0[a:b], seeds, sizes[a:b], shape, a, scale_bits))
        parts = [self._receive(proc) for proc, _ in zip(self.workers, batches, strict=False)]
        return np.concatenate(parts)

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], message: object) -> None:
        assert proc.stdin is not None
        try:
            pickle.dump(message, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise PayloadError(
                f"a CKKS worker process is gone ({err}); restart the client", "worker-died"
            ) from err

    @staticmethod
    def _receive(proc: subprocess.Popen[bytes]) -> Any:
        assert proc.stdout is not None
        try:
            result = pickle.load(proc.stdout)
        except EOFError as err:
            code = proc.wait()
            raise PayloadError(
                f"a CKKS worker process died (exit code {code}); restart the client",
                "worker-died",
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
