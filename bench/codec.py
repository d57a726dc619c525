"""Codec micro-benchmark: what secure aggregation costs per parameter, against two references.

Run ``python bench/codec.py [--quick] [--out DIR]`` from the repository root.

What is measured, and why
-------------------------
One federated round moves every model parameter through three steps: each client encrypts its
(weighted) update, the server adds the payloads it cannot read, and a client decrypts the sum.
For each step this script reports throughput in parameters per second, and for the wire the
payload size in bytes per parameter (upload payload length / number of values). Three configs
run in the same process, on the same machine, on the same random vectors:

``plain``
    ``secagg.crypto.plain.PlainCipher``: float32 in the secagg envelope. The floor: no privacy.
``secagg-packed``
    ``CkksClient``/``CkksServer`` with the default ``CkksParams`` (N=8192, primes (60, 60)),
    keys made by ``secagg.keys.generate`` and loaded per role. Clients weight their own update
    and quantize it like a client does (``secagg.quantize``, one range for the whole vector),
    three 15-bit values per slot (and, for the wire section, the fine packing: two 23-bit
    values); the server only adds ciphertexts, as numbers mod q.
``peer-baseline``
    NVIDIA FLARE's HE example setting, written here directly against TenSEAL: N=8192, primes
    (60, 40, 40, 60), scale 2**40, public-key encryption, one CKKS vector per model tensor
    (TenSEAL splits a long tensor over several ciphertexts itself), and the *server* weighting
    each client: ``ct * w`` (a plaintext multiply plus rescale) before adding. Tensor sizes follow
    ``ModerateCNN``'s state dict, cycled and truncated for the synthetic sizes. No Galois or
    relinearization keys are made: none of the timed operations needs them.

Every config is bytes in, bytes out at each step (serialization and parsing are timed), and
the decrypted sum is checked against the plaintext weighted sum (``max_abs_error``).

Sizes: 100k, 1M and 10M parameters and the ModerateCNN size (3,491,530, counted from the model).
Sum throughput counts every incoming parameter: ``clients * size / seconds``.

A second part times ``CkksServer.sum`` for 2, 8, 32 and 128 clients at one vector size and
records the peak resident memory of that step. ``sum`` takes an iterable and holds only the
running total and the current payload, so time should grow linearly with clients while peak
memory stays at a constant working set; the same sum given a list of all payloads (the control
column) grows by one payload per client, which also shows the memory probe sees growth.

A third part measures a server *process* as deployed (no torch, no TenSEAL): its peak RSS above
idle while it sums 8 payloads of a 10M-parameter model read one at a time, in payloads
(``--server-size``, ``--server-clients``; ``--quick`` skips it).

On a 2-core machine the default run takes about a minute and peaks near 3 GB of RSS (the
10M round: three 10M payloads plus the transient copies the ciphers make). The peer baseline
stops at the ModerateCNN size by default (``--peer-max``): at 10M it adds over a minute and up
to ~2 GB more peak RSS (7.3 GB seen), while its per-parameter costs are already flat from 1M
up; ``--peer-max 10000000`` includes it. ``--quick`` skips 10M for every config, uses 2 clients
and takes about 40 s.

Timing is wall clock (``time.perf_counter``) and CPU time of this process (all threads: secagg's
CKKS work runs in-process, its encryptions of zero in a background thread). CPU seconds are what
the "one core" figures use, so they do not depend on how many threads did the work.
Throughputs use wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tenseal as ts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the bench package beside secagg

from bench.harness import PeakRss, Stopwatch, machine, rusage_kib, table, write_report  # noqa: E402
from secagg import keys as secagg_keys  # noqa: E402
from secagg import quantize  # noqa: E402
from secagg.config import CkksParams  # noqa: E402
from secagg.crypto import SERVER, ClientCipher, ServerCipher, Stamp, Update, envelope  # noqa: E402
from secagg.crypto.ckks import CkksClient  # noqa: E402
from secagg.crypto.ckks_server import CkksServer  # noqa: E402
from secagg.crypto.packing import PACKED  # noqa: E402
from secagg.crypto.plain import PlainCipher  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MODEL_SIZE = "cnn"  # --sizes token for the ModerateCNN parameter count
DEFAULT_SIZES = "100000,1000000,cnn,10000000"
QUICK_SIZES = "100000,1000000,cnn"
DEFAULT_SCALING_CLIENTS = "2,8,32,128"
# Distinct update vectors for the scaling part; clients beyond this encrypt them again in turn
# (every client's payload is its own encryption, so the server sees no duplicate).
SCALING_DISTINCT_VECTORS = 4
UPDATE_STD = 0.01  # model updates are small; any value well inside the CKKS range would do

Payload = Any  # bytes for the secagg envelopes, tuple[bytes, ...] (one per tensor) for the peer


class Codec(Protocol):
    """One config under test, bytes in and bytes out at every step."""

    name: str
    threads: str

    def encrypt(self, vector: np.ndarray, weight: float, sender: int) -> Payload: ...

    def aggregate(self, payloads: Iterable[tuple[Payload, float]]) -> Payload: ...

    def decrypt(self, payload: Payload) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Configs


class CipherCodec:
    """A secagg client/server cipher pair: the client weights its update, the server adds.

    ``plain`` (float32 vectors) and ``secagg-packed`` (our CKKS codec, keys from
    ``secagg.keys``) are both this adapter around different ciphers. For an integer codec the
    adapter quantizes like a client does (``secagg.quantize``), with one step for the whole
    vector in place of the round's scale exchange (which ``compare_he.py`` measures; it costs
    about 1.5% of the update's ciphertexts). Every payload is stamped for one round of a roster
    of ``ROSTER`` clients (their tally costs 128 values per payload, nothing at these sizes).
    """

    ROSTER = 128

    def __init__(self, name: str, threads: str, client: ClientCipher, server: ServerCipher) -> None:
        self.name = name
        self.threads = threads
        self.client = client
        self.server = server
        self.round = Stamp(bytes(16), 1, SERVER, self.ROSTER)
        #: where the keys are, for the server-memory probe (secagg codecs only)
        self.keys_dir = ""

    def encrypt(self, vector: np.ndarray, weight: float, sender: int) -> Payload:
        values = vector * weight
        if self.client.sum_limit is not None:
            values, _ = quantize.quantize(values, self._step(), np.array([values.size]))
        return self.client.encrypt(Update(values, weight), self.round.for_sender(sender))

    def aggregate(self, payloads: Iterable[tuple[Payload, float]]) -> Payload:
        return self.server.sum((payload for payload, _ in payloads), self.round)

    def decrypt(self, payload: Payload) -> np.ndarray:
        values = self.client.decrypt(payload, self.round).values
        if self.client.sum_limit is not None:
            quantize.dequantize(values, self._step(), np.array([values.size]))
        return values

    def _step(self) -> np.ndarray:
        """One step for the whole vector, as the scale exchange would agree on: every client's
        weighted values lie within ``weight * QUANT_RANGE * UPDATE_STD`` and the weights sum to
        at most one, so the sum of any roster stays within the codec's limit."""
        assert self.client.sum_limit is not None
        bound = QUANT_RANGE * UPDATE_STD
        return np.array([bound / (self.client.sum_limit - (self.ROSTER + 1) // 2)])


QUANT_RANGE = 8.0


def plain_codec() -> CipherCodec:
    cipher = PlainCipher()
    return CipherCodec("plain", "n/a (numpy)", cipher, cipher)


SECAGG_PACKED = "secagg-packed"


class PeerBaselineCodec:
    """FLARE's HE example setting: one CKKS vector per tensor, the server weights (ct * w)."""

    name = "peer-baseline"
    POLY_MODULUS_DEGREE = 8192
    COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
    SCALE_BITS = 40

    def __init__(self, tensor_sizes: Callable[[int], list[int]], n_threads: int | None) -> None:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=self.POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(self.COEFF_MOD_BIT_SIZES),
            encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
            n_threads=n_threads,
        )
        context.global_scale = 2.0**self.SCALE_BITS
        secret = context.serialize(save_secret_key=True)
        context.make_context_public()
        # Each party loads its context from bytes, as it would from the provisioned files.
        self._client = ts.context_from(secret, n_threads)
        self._server = ts.context_from(context.serialize(), n_threads)
        self._tensor_sizes = tensor_sizes
        self.threads = (
            f"{n_threads}, set by --peer-threads" if n_threads else "TenSEAL default (= CPU count)"
        )

    def encrypt(self, vector: np.ndarray, weight: float, sender: int) -> Payload:
        del weight, sender  # the server weights in this design; one ciphertext per tensor
        blobs = []
        start = 0
        for size in self._tensor_sizes(vector.size):
            tensor = vector[start : start + size]
            start += size
            with quiet_stdout():  # TenSEAL prints a warning for every multi-ciphertext vector
                encrypted = ts.ckks_vector(self._client, tensor.tolist())
            blobs.append(encrypted.serialize())
        return tuple(blobs)

    def aggregate(self, payloads: Iterable[tuple[Payload, float]]) -> Payload:
        totals: list[ts.CKKSVector] = []
        for blobs, weight in payloads:
            weighted = [ts.ckks_vector_from(self._server, blob) * weight for blob in blobs]
            if not totals:
                totals = weighted
                continue
            for total, item in zip(totals, weighted, strict=True):
                total += item
        return tuple(total.serialize() for total in totals)

    def decrypt(self, payload: Payload) -> np.ndarray:
        parts = [ts.ckks_vector_from(self._client, blob).decrypt() for blob in payload]
        return np.concatenate([np.asarray(part, dtype=np.float64) for part in parts])


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 (TenSEAL's C++ warnings bypass ``sys.stdout``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def secagg_packed_codec(params: CkksParams) -> Iterator[CipherCodec]:
    """Keys generated into a temporary directory and loaded per role, as a deployment would."""
    with tempfile.TemporaryDirectory(prefix="secagg-bench-keys-") as keys_dir:
        secagg_keys.generate(keys_dir, params)
        client = CkksClient(secagg_keys.load_for_client(keys_dir))
        server = CkksServer(secagg_keys.load_for_server(keys_dir))
        threads = "1 thread (numba kernels; encryptions of zero prepared in a second)"
        codec = CipherCodec(SECAGG_PACKED, threads, client, server)
        codec.keys_dir = keys_dir
        yield codec


# ---------------------------------------------------------------------------------------------
# Bytes on the wire of a whole HE round

WIRE_MODELS = (("mlp (digits)", "mlp", (64,)), ("ModerateCNN", "moderate-cnn", (3, 32, 32)))
WIRE_CLIENTS = 8


def unseeded_size(payload: bytes) -> int:
    """What ``payload`` took in the format before seeded ciphertexts (envelope version 3): no
    seed fields or seeds, and every ciphertext's ``c1`` sent as N words like its ``c0``."""
    count, size, _, seed_size, seeds = struct.unpack_from(
        ">IQIHI", payload, envelope.HEADER_SIZE - 22
    )
    return len(payload) - seed_size * seeds - 6 + count * size


def run_wire(codec: CipherCodec, models: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[dict]:
    """One real HE round of ``WIRE_CLIENTS`` clients per model, both phases (the scale exchange
    and the update), at each ``he_precision`` (standard, fine): bytes per value each way,
    measured on the payloads, next to the same payloads in the earlier format
    (``unseeded_size``). The sum is decrypted and checked."""
    fine = CipherCodec(
        SECAGG_PACKED,
        codec.threads,
        CkksClient(secagg_keys.load_for_client(codec.keys_dir), precision="fine"),
        CkksServer(secagg_keys.load_for_server(codec.keys_dir), precision="fine"),
    )
    return _wire(codec, models, "standard") + _wire(fine, models, "fine")


def _wire(
    codec: CipherCodec, models: Sequence[tuple[str, str, tuple[int, ...]]], precision: str
) -> list[dict]:
    from secagg.crypto.quantized import QuantizedCipher
    from secagg.flatten import layout_of
    from secagg.models import build_model

    rows = []
    stamp = Stamp(bytes(16), 1, SERVER, WIRE_CLIENTS)
    for label, name, in_shape in models:
        layout = layout_of(build_model(name, in_shape, 10, 0).state_dict())
        # One cipher per client, as in a run: each remembers its own sample count.
        ciphers = [QuantizedCipher(codec.client, layout) for _ in range(WIRE_CLIENTS)]  # type: ignore[arg-type]
        cipher = ciphers[0]
        rng = np.random.default_rng(0)
        changes = [rng.normal(0, UPDATE_STD, layout.size) for _ in range(WIRE_CLIENTS)]
        samples = np.arange(1, WIRE_CLIENTS + 1)  # as client_weights: 1, 2, ... samples
        weights = samples / samples.sum()
        scales = [
            ciphers[i].prepare(c, stamp.for_sender(i), int(samples[i]))
            for i, c in enumerate(changes)
        ]
        agreed = codec.server.sum(scales, stamp.scales())
        updates = [
            ciphers[i].encrypt(Update(c * w, w), stamp.for_sender(i), agreed)
            for i, (c, w) in enumerate(zip(changes, weights, strict=True))
        ]
        total = codec.server.sum(updates, stamp)
        result = cipher.decrypt(total, stamp, agreed)
        expected = np.sum([c * w for c, w in zip(changes, weights, strict=True)], axis=0)
        up = {"scales": scales[0], "update": updates[0]}
        down = {"scales": agreed, "update": total}
        row: dict[str, Any] = {
            "model": label,
            "precision": precision,
            "values": layout.size,
            "clients": WIRE_CLIENTS,
        }
        for way, payloads in (("up", up), ("down", down)):
            for fmt, size_of in (("seeded", len), ("unseeded", unseeded_size)):
                sizes = {phase: size_of(payload) for phase, payload in payloads.items()}
                row[f"{way}_{fmt}_bytes"] = sum(sizes.values())
                row[f"{way}_{fmt}_scales_per_value"] = sizes["scales"] / layout.size
                row[f"{way}_{fmt}_per_value"] = sum(sizes.values()) / layout.size
        row["max_abs_error"] = float(np.abs(result.values - expected).max())
        rows.append(row)
        print(
            f"  {label}, {precision}: {row['up_unseeded_per_value']:.2f} -> "
            f"{row['up_seeded_per_value']:.2f} "
            f"B/value up, {row['down_unseeded_per_value']:.2f} -> "
            f"{row['down_seeded_per_value']:.2f} down",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Model sizes


@functools.lru_cache(maxsize=1)
def model_tensor_sizes() -> tuple[int, ...]:
    """Sizes of ModerateCNN's state-dict tensors, in order (what FLARE encrypts one by one)."""
    from secagg.models import ModerateCNN  # torch is slow to import; only load it when needed

    return tuple(int(t.numel()) for t in ModerateCNN().state_dict().values())


def model_param_count() -> int:
    """ModerateCNN's trainable parameters (3,491,530)."""
    from secagg.models import ModerateCNN

    return sum(p.numel() for p in ModerateCNN().parameters())


def peer_tensor_sizes(n: int) -> list[int]:
    """ModerateCNN's tensor sizes, cycled and the last one cut, until they cover ``n`` values."""
    sizes: list[int] = []
    covered = 0
    pattern = model_tensor_sizes()
    index = 0
    while covered < n:
        size = min(pattern[index % len(pattern)], n - covered)
        sizes.append(size)
        covered += size
        index += 1
    return sizes


def size_label(n: int, model_n: int | None) -> str:
    if n == model_n:
        return f"ModerateCNN ({n:,})"
    for unit, name in ((1_000_000, "M"), (1_000, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return f"{n:,}"


# ---------------------------------------------------------------------------------------------
# Measuring


def payload_size(payload: Payload) -> int:
    if isinstance(payload, bytes | bytearray):
        return len(payload)
    return sum(len(blob) for blob in payload)


def client_weights(clients: int) -> list[float]:
    """FedAvg weights proportional to 1, 2, ..., clients samples; they sum to one."""
    raw = np.arange(1, clients + 1, dtype=np.float64)
    return [float(w) for w in raw / raw.sum()]


def warm_up(codec: Codec) -> None:
    """One tiny round so first-call costs (memory pools, lazy setup) are not timed."""
    vector = np.linspace(-0.01, 0.01, 1000)
    payloads = [(codec.encrypt(vector, 0.5, sender), 0.5) for sender in (0, 1)]
    codec.decrypt(codec.aggregate(payloads))


def measure(codec: Codec, vectors: Sequence[np.ndarray], weights: Sequence[float]) -> dict:
    """One round: every client encrypts, the server aggregates, one client decrypts."""
    n = vectors[0].size
    clients = len(vectors)
    payloads = []
    enc_wall = enc_cpu = 0.0
    for sender, (vector, weight) in enumerate(zip(vectors, weights, strict=True)):
        with Stopwatch() as watch:
            payloads.append(codec.encrypt(vector, weight, sender))
        enc_wall += watch.wall
        enc_cpu += watch.cpu
    upload = sum(payload_size(p) for p in payloads) / clients
    with Stopwatch() as sum_watch:
        total = codec.aggregate((p, w) for p, w in zip(payloads, weights, strict=True))
    del payloads
    with Stopwatch() as dec_watch:
        result = codec.decrypt(total)
    expected = np.zeros(n)
    for vector, weight in zip(vectors, weights, strict=True):
        expected += vector * weight
    return {
        "encrypt_params_per_s": clients * n / enc_wall,
        "sum_params_per_s": clients * n / sum_watch.wall,
        "decrypt_params_per_s": n / dec_watch.wall,
        "bytes_per_param": upload / n,
        "result_bytes_per_param": payload_size(total) / n,
        "encrypt_s_per_client": enc_wall / clients,
        "sum_s": sum_watch.wall,
        "decrypt_s": dec_watch.wall,
        "encrypt_cpu_s_per_client": enc_cpu / clients,
        "sum_cpu_s": sum_watch.cpu,
        "decrypt_cpu_s": dec_watch.cpu,
        # one client's encrypt plus one decrypt, CPU seconds (= seconds on one core) per 1M
        "enc_dec_cpu_s_per_million": (enc_cpu / clients + dec_watch.cpu) / (n / 1e6),
        "enc_dec_wall_s_per_million": (enc_wall / clients + dec_watch.wall) / (n / 1e6),
        # above 1 only when TenSEAL kept more than one core busy
        "cpu_per_wall": (enc_cpu + sum_watch.cpu + dec_watch.cpu)
        / (enc_wall + sum_watch.wall + dec_watch.wall),
        "max_abs_error": float(np.abs(result - expected).max()),
    }


def random_vectors(n: int, clients: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n) * UPDATE_STD for _ in range(clients)]


def run_throughput(
    codecs: Sequence[Codec],
    sizes: Sequence[int],
    clients: int,
    peer_max: int,
    seed: int,
    model_n: int | None = None,
) -> tuple[list[dict], list[str]]:
    """Every config at every size on the same vectors; the peer only up to ``peer_max``."""
    rows: list[dict] = []
    skipped: list[str] = []
    weights = client_weights(clients)
    for n in sizes:
        vectors = random_vectors(n, clients, seed)
        for codec in codecs:
            label = size_label(n, model_n)
            if codec.name == PeerBaselineCodec.name and n > peer_max:
                skipped.append(
                    f"{codec.name} at {label}: over --peer-max {peer_max:,} "
                    "(memory and time; pass --peer-max 10000000 to include it)"
                )
                continue
            print(f"  {label:>24}  {codec.name:<14}", end="", flush=True)
            row = measure(codec, vectors, weights)
            print(
                f"  enc {row['encrypt_s_per_client']:.2f}s/client"
                f"  sum {row['sum_s']:.2f}s  dec {row['decrypt_s']:.2f}s",
                flush=True,
            )
            rows.append({"config": codec.name, "size": n, "label": label, **row})
            gc.collect()
        del vectors
    return rows, skipped


def run_scaling(codec: CipherCodec, n: int, client_counts: Sequence[int], seed: int) -> dict:
    """Time and peak RSS of ``CkksServer.sum`` as clients grow, payloads streamed in.

    As a control (and a check that the memory probe sees growth at all), the same sum is then
    given a list holding every payload at once, the way a server that waits for all uploads
    before adding would hold them.
    """
    most = max(client_counts)
    # Every client's weight is 1 / the largest count, so the weights of any round add up to
    # at most 1, as FedAvg's do (the packed codec's headroom relies on it).
    vectors = random_vectors(n, min(SCALING_DISTINCT_VECTORS, most), seed)
    payloads = [
        codec.encrypt(vectors[sender % len(vectors)], 1.0 / most, sender) for sender in range(most)
    ]
    payload_bytes = len(payloads[0])

    def arriving(clients: int) -> Iterator[bytes]:
        # A fresh copy per client, as if read off the network; dropped once it has been added.
        for index in range(clients):
            yield bytes(memoryview(payloads[index]))

    def timed(clients: int) -> Stopwatch:
        gc.collect()
        with Stopwatch() as watch:
            codec.aggregate((p, 0.0) for p in arriving(clients))
        return watch

    def peak(clients: int, hold_all: bool) -> PeakRss:
        # A separate run: PeakRss trims the heap first, and re-faulting it would be timed.
        with PeakRss() as memory:
            stream = list(arriving(clients)) if hold_all else arriving(clients)
            codec.aggregate((p, 0.0) for p in stream)
        return memory

    codec.aggregate((p, 0.0) for p in arriving(2))  # warm up, so the first count is not charged
    rows = []
    method = ""
    # Streamed runs first: the list runs leave freed heap behind that later runs could reuse.
    for clients in client_counts:
        watch = timed(clients)
        memory = peak(clients, hold_all=False)
        method = memory.method
        rows.append(
            {
                "clients": clients,
                "sum_s": watch.wall,
                "sum_s_per_client": watch.wall / clients,
                "peak_rss_bytes": memory.peak_bytes,
            }
        )
        print(
            f"  {clients:>4} clients  sum {watch.wall:.3f}s  "
            f"peak RSS +{memory.peak_bytes / 2**20:.1f} MiB",
            flush=True,
        )
    for row in rows:
        row["peak_rss_bytes_list"] = peak(row["clients"], hold_all=True).peak_bytes
    counts = np.array([row["clients"] for row in rows], dtype=np.float64)
    seconds = np.array([row["sum_s"] for row in rows])
    fit: dict[str, float] = {}
    if len(rows) >= 2:
        time_slope, time_intercept = np.polyfit(counts, seconds, 1)
        predicted = time_slope * counts + time_intercept
        spread = float(((seconds - seconds.mean()) ** 2).sum())
        r2 = 1 - float(((seconds - predicted) ** 2).sum()) / spread if spread > 0 else 1.0
        fit = {
            "time_s_per_client": float(time_slope),
            "time_r2": r2,
            "memory_bytes_per_client": _slope(counts, rows, "peak_rss_bytes"),
            "memory_bytes_per_client_list": _slope(counts, rows, "peak_rss_bytes_list"),
        }
    return {
        "config": codec.name,
        "size": n,
        "payload_bytes": payload_bytes,
        "distinct_vectors": len(vectors),
        "memory_method": method,
        "rows": rows,
        "fit": fit,
    }


# A server process, as deployed: it imports neither torch nor TenSEAL, loads the public keys,
# then sums payloads read one at a time. It prints its idle and peak RSS (kernel high-water
# mark, reset after loading the keys) as JSON.
_SERVER_PROBE = """
import gc, json, sys
from pathlib import Path
from secagg import keys
from secagg.crypto import SERVER, Stamp
from secagg.crypto.ckks_server import CkksServer
folder, keys_dir, clients, roster = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
server = CkksServer(keys.load_for_server(keys_dir))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
gc.collect()
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
idle = status("VmRSS")
paths = (Path(folder) / f"p{i}" for i in range(clients))
server.sum((path.read_bytes() for path in paths), Stamp(bytes(16), 1, SERVER, roster))
print(json.dumps({"idle_rss_bytes": idle, "peak_rss_bytes": status("VmHWM")}))
"""


def run_server_memory(codec: CipherCodec, n: int, clients: int, seed: int) -> dict:
    """Peak RSS of a separate server process summing ``clients`` payloads of ``n`` values,
    above its idle RSS, in bytes and in payloads (issue 4's target: at most 3)."""
    with tempfile.TemporaryDirectory(prefix="secagg-bench-payloads-") as folder:
        for sender, vector in enumerate(random_vectors(n, clients, seed)):
            payload = codec.encrypt(vector, 1.0 / clients, sender)
            (Path(folder) / f"p{sender}").write_bytes(payload)
            del payload
        size = (Path(folder) / "p0").stat().st_size
        root = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        argv = [folder, codec.keys_dir, str(clients), str(codec.ROSTER)]
        done = subprocess.run(
            [sys.executable, "-c", _SERVER_PROBE, *argv],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    growth = probe["peak_rss_bytes"] - probe["idle_rss_bytes"]
    return {
        "size": n,
        "clients": clients,
        "payload_bytes": size,
        **probe,
        "growth_bytes": growth,
        "growth_in_payloads": growth / size,
    }


def _slope(x: np.ndarray, rows: Sequence[dict], key: str) -> float:
    values = np.array([row[key] for row in rows], dtype=np.float64)
    return float(np.polyfit(x, values, 1)[0])


def speedups(rows: Sequence[dict]) -> list[dict]:
    """Each secagg CKKS codec over peer-baseline at every size both ran (>1: secagg wins)."""
    by_key = {(row["config"], row["size"]): row for row in rows}
    out = []
    for (config, n), ours in by_key.items():
        peer = by_key.get((PeerBaselineCodec.name, n))
        if not config.startswith("secagg-") or peer is None:
            continue
        out.append(
            {
                "size": n,
                "label": ours["label"],
                "config": config,
                "encrypt": ours["encrypt_params_per_s"] / peer["encrypt_params_per_s"],
                "sum": ours["sum_params_per_s"] / peer["sum_params_per_s"],
                "decrypt": ours["decrypt_params_per_s"] / peer["decrypt_params_per_s"],
                "enc_dec_cpu": peer["enc_dec_cpu_s_per_million"]
                / ours["enc_dec_cpu_s_per_million"],
                "bytes": peer["bytes_per_param"] / ours["bytes_per_param"],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _rate(value: float) -> str:
    for unit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= unit:
            return f"{value / unit:.2f} {suffix}"
    return f"{value:.0f}"


def render_markdown(results: dict) -> str:
    machine, settings = results["machine"], results["settings"]
    lines = [
        f"# Codec benchmark, {machine['date']}",
        "",
        f"Total run time {results['elapsed_s']:.0f} s{' (--quick)' if settings['quick'] else ''}, "
        f"peak RSS of the throughput part {machine['process_peak_rss_bytes'] / 2**30:.2f} GiB.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs "
        f"({machine['cpus_usable']} usable), {machine['platform']}; Python {machine['python']}, "
        f"TenSEAL {machine['tenseal']}, numpy {machine['numpy']}.",
        "",
        f"Round: {settings['clients']} clients, FedAvg weights proportional to 1..n, "
        f"updates ~ N(0, {UPDATE_STD}), seed {settings['seed']}. Sum throughput counts every "
        "incoming parameter (clients x size / s). Bytes per parameter: one client's upload.",
        "",
        "## Throughput (parameters per second, wall clock)",
        "",
    ]
    lines += table(
        ["size", "config", "encrypt", "sum", "decrypt", "B/param up", "B/param sum", "max err"],
        (
            (
                row["label"],
                row["config"],
                _rate(row["encrypt_params_per_s"]),
                _rate(row["sum_params_per_s"]),
                _rate(row["decrypt_params_per_s"]),
                f"{row['bytes_per_param']:.2f}",
                f"{row['result_bytes_per_param']:.2f}",
                f"{row['max_abs_error']:.1e}",
            )
            for row in results["throughput"]
        ),
    )
    for note in results["skipped"]:
        lines.append(f"\nSkipped: {note}.")
    if results.get("wire"):
        lines += [
            "",
            f"## Bytes per value on the wire, one HE round of {WIRE_CLIENTS} clients",
            "",
            "Both phases (scale exchange + update) of one client's upload and of what every "
            "client downloads, measured on real payloads; 'before' is the same payloads with "
            "c1 sent as N words, as envelope version 3 did, 'now' sends c0 and a 32-byte seed.",
            "",
        ]
        lines += table(
            [
                "model",
                "he_precision",
                "values",
                "up before",
                "up now",
                "down before",
                "down now",
                "of which scales",
            ],
            (
                (
                    w["model"],
                    w.get("precision", "standard"),
                    f"{w['values']:,}",
                    f"{w['up_unseeded_per_value']:.2f}",
                    f"**{w['up_seeded_per_value']:.2f}**",
                    f"{w['down_unseeded_per_value']:.2f}",
                    f"**{w['down_seeded_per_value']:.2f}**",
                    f"{w['up_seeded_scales_per_value']:.2f} up, "
                    f"{w['down_seeded_scales_per_value']:.2f} down",
                )
                for w in results["wire"]
            ),
        )
    lines += ["", "## Encrypt + decrypt on one core (CPU seconds per 1M parameters)", ""]
    sizes = list(dict.fromkeys(row["label"] for row in results["throughput"]))
    configs = list(dict.fromkeys(row["config"] for row in results["throughput"]))
    threads = results["threads"]
    cell = {
        (r["config"], r["label"]): r["enc_dec_cpu_s_per_million"] for r in results["throughput"]
    }
    parallel = {
        config: max(r["cpu_per_wall"] for r in results["throughput"] if r["config"] == config)
        for config in configs
    }
    lines += table(
        ["config", "TenSEAL n_threads", "max CPU/wall", *sizes],
        (
            [config, threads[config], f"{parallel[config]:.2f}"]
            + [f"{cell[(config, s)]:.3f}" if (config, s) in cell else "-" for s in sizes]
            for config in configs
        ),
    )
    lines += [
        "",
        "One client's encrypt plus one decrypt, in process CPU time (all threads added), so the "
        "figure is seconds of one core whatever the thread count. CPU/wall is CPU over wall time "
        "across all three steps (the largest over sizes): about 1 means one core did the work "
        "even where TenSEAL was allowed more threads.",
        "",
        "## secagg codecs vs peer-baseline (x times faster / smaller; >1 favours secagg)",
        "",
    ]
    lines += table(
        ["size", "config", "encrypt", "sum", "decrypt", "enc+dec CPU", "bytes"],
        (
            (
                s["label"],
                s["config"],
                f"{s['encrypt']:.2f}x",
                f"{s['sum']:.2f}x",
                f"{s['decrypt']:.2f}x",
                f"{s['enc_dec_cpu']:.2f}x",
                f"{s['bytes']:.2f}x",
            )
            for s in results["speedup"]
        ),
    )
    scaling = results["scaling"]
    if scaling:
        lines += [
            "",
            f"## Server sum scaling: {scaling['config']}, {scaling['size']:,} parameters",
            "",
            f"Payload {scaling['payload_bytes'] / 2**20:.2f} MiB. Every client encrypts its own "
            f"payload (of {scaling['distinct_vectors']} distinct vectors, cycled); each arrives as "
            "a fresh copy of "
            "the bytes from a generator. Time and memory come from separate runs. Peak memory: "
            f"{scaling['memory_method']}, above the RSS before the sum (after malloc_trim). "
            "Control column: the same sum given a list of every payload at once.",
            "",
        ]
        lines += table(
            ["clients", "sum s", "per client", "peak RSS MiB, streamed", "control: list, MiB"],
            (
                (
                    r["clients"],
                    f"{r['sum_s']:.3f}",
                    f"{r['sum_s_per_client'] * 1e3:.2f} ms",
                    f"{r['peak_rss_bytes'] / 2**20:.1f}",
                    f"{r['peak_rss_bytes_list'] / 2**20:.1f}",
                )
                for r in scaling["rows"]
            ),
        )
        fit = scaling["fit"]
        if fit:
            lines += [
                "",
                f"Linear fit: {fit['time_s_per_client'] * 1e3:.2f} ms per client "
                f"(R^2 {fit['time_r2']:.3f}); peak memory "
                f"{fit['memory_bytes_per_client'] / 2**20:+.3f} MiB per extra client streamed, "
                f"{fit['memory_bytes_per_client_list'] / 2**20:+.2f} MiB per client with the list "
                f"(one payload is {scaling['payload_bytes'] / 2**20:.2f} MiB).",
            ]
    memory = results.get("server_memory")
    if memory:
        lines += [
            "",
            f"## Server process memory: {memory['clients']} clients x {memory['size']:,} "
            "parameters",
            "",
            f"A separate server process (no torch, no TenSEAL) loads the public keys and sums "
            f"{memory['clients']} payloads of {memory['payload_bytes'] / 2**20:.1f} MiB, read "
            f"one at a time. Idle RSS {memory['idle_rss_bytes'] / 2**20:.0f} MiB, peak "
            f"{memory['peak_rss_bytes'] / 2**20:.0f} MiB: **"
            f"{memory['growth_in_payloads']:.2f} payloads above idle**.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_sizes(text: str) -> tuple[list[int], int | None]:
    """Comma list of parameter counts, ``cnn`` standing for ModerateCNN's; also that count."""
    tokens = [part.strip() for part in text.split(",") if part.strip()]
    model_n = model_param_count() if MODEL_SIZE in tokens else None
    sizes: list[int] = []
    for token in tokens:
        if token == MODEL_SIZE and model_n is not None:
            sizes.append(model_n)
        elif token.isdigit() and int(token) > 0:
            sizes.append(int(token))
        else:
            raise SystemExit(f"--sizes takes positive counts or '{MODEL_SIZE}', not {token!r}")
    if not sizes:
        raise SystemExit("--sizes is empty")
    return sizes, model_n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Codec micro-benchmark: plain vs secagg's CKKS codecs vs the FLARE HE peer."
    )
    parser.add_argument("--quick", action="store_true", help="skip 10M, use 2 clients")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    parser.add_argument(
        "--sizes",
        help=f"comma list of parameter counts, '{MODEL_SIZE}' = ModerateCNN "
        f"(default {DEFAULT_SIZES}; --quick {QUICK_SIZES})",
    )
    parser.add_argument(
        "--round-clients", type=int, help="clients in the throughput round (default 3, quick 2)"
    )
    parser.add_argument(
        "--clients",
        type=_int_list,
        default=_int_list(DEFAULT_SCALING_CLIENTS),
        help=f"client counts for the sum-scaling part (default {DEFAULT_SCALING_CLIENTS})",
    )
    parser.add_argument(
        "--scale-size", type=int, default=100_000, help="vector size for the scaling part"
    )
    parser.add_argument(
        "--peer-max",
        type=int,
        default=4_000_000,
        help="largest size the peer baseline runs at (default 4M: up to ModerateCNN; "
        "10000000 adds the peer at 10M: over a minute more and up to ~7 GB peak RSS)",
    )
    parser.add_argument(
        "--peer-threads", type=int, default=0, help="TenSEAL n_threads for the peer (0: default)"
    )
    parser.add_argument(
        "--server-size",
        type=int,
        help="model size for the server-process memory part (default 10M; --quick: skipped; "
        "0 skips it)",
    )
    parser.add_argument(
        "--server-clients", type=int, default=8, help="clients in the server-memory part"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wire-models",
        default="mlp,moderate-cnn",
        help="built-in models whose HE round is measured byte for byte ('' for none)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the markdown report, write .md and .json; return the results."""
    args = build_parser().parse_args(argv)
    if args.server_size is None:
        args.server_size = 0 if args.quick else 10_000_000
    sizes, model_n = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    clients = args.round_clients or (2 if args.quick else 3)
    peer_threads = args.peer_threads or None
    started = time.perf_counter()
    with secagg_packed_codec(CkksParams()) as packed:
        codecs: list[Codec] = [
            plain_codec(),
            packed,
            PeerBaselineCodec(peer_tensor_sizes, peer_threads),
        ]
        for codec in codecs:
            warm_up(codec)
        # Scaling first, while the heap is small: its memory figures are deltas over RSS.
        print(f"Sum scaling, {args.scale_size:,} parameters:", flush=True)
        scaling = run_scaling(packed, args.scale_size, args.clients, args.seed)
        print(f"Throughput, {clients} clients:", flush=True)
        rows, skipped = run_throughput(codecs, sizes, clients, args.peer_max, args.seed, model_n)
        wire = []
        chosen = [m for m in WIRE_MODELS if m[1] in args.wire_models.split(",")]
        if chosen:
            print(f"Bytes on the wire, one HE round of {WIRE_CLIENTS} clients:", flush=True)
            wire = run_wire(packed, chosen)
        threads = {codec.name: codec.threads for codec in codecs}
        server_memory = None
        if args.server_size:
            print(
                f"Server process memory, {args.server_clients} clients x "
                f"{args.server_size:,} parameters:",
                flush=True,
            )
            server_memory = run_server_memory(
                packed, args.server_size, args.server_clients, args.seed
            )
            print(f"  {server_memory['growth_in_payloads']:.2f} payloads above idle", flush=True)
    results: dict[str, Any] = {
        "machine": machine(
            tenseal=ts.__version__,
            peer_tenseal_threads=peer_threads or os.cpu_count(),
            # getrusage's peak is reset along with VmHWM, so this covers the throughput part
            process_peak_rss_bytes=rusage_kib() * 1024,
        ),
        "settings": {
            "quick": args.quick,
            "sizes": sizes,
            "clients": clients,
            "scaling_clients": args.clients,
            "scale_size": args.scale_size,
            "peer_max": args.peer_max,
            "seed": args.seed,
            "secagg_params": {
                "poly_modulus_degree": CkksParams().poly_modulus_degree,
                "coeff_mod_bit_sizes": list(CkksParams().coeff_mod_bit_sizes),
                "packing": dataclasses.asdict(PACKED),
            },
            "peer_params": {
                "poly_modulus_degree": PeerBaselineCodec.POLY_MODULUS_DEGREE,
                "coeff_mod_bit_sizes": list(PeerBaselineCodec.COEFF_MOD_BIT_SIZES),
                "global_scale_bits": PeerBaselineCodec.SCALE_BITS,
            },
        },
        "threads": threads,
        "throughput": rows,
        "skipped": skipped,
        "speedup": speedups(rows),
        "scaling": scaling,
        "server_memory": server_memory,
        "wire": wire,
    }
    results["elapsed_s"] = time.perf_counter() - started
    results["markdown"] = render_markdown(results)
    saved = {k: v for k, v in results.items() if k != "markdown"}
    md_path, json_path = write_report(saved, results["markdown"], args.out, "codec")
    results["files"] = {"markdown": str(md_path), "json": str(json_path)}
    print()
    print(results["markdown"])
    print(f"Wrote {md_path} and {json_path} ({results['elapsed_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
