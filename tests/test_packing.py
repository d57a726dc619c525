"""The packed codec: aggregates equal the exact integer sums, up to the overflow edge.

Property tests drive random clients through the client-side quantizer and the packer, add the
packed slots as integers (what homomorphic addition does, minus the noise), and unpack; the
CKKS tests then do the same through real encryption at the edge of the headroom.
"""

from __future__ import annotations

import numpy as np
import oracles
import pytest
from conftest import encrypt_all, round_of
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import quantize
from secagg.config import RunConfig
from secagg.crypto import Update
from secagg.crypto.packing import PACKED, PACKINGS, PackedParams
from secagg.crypto.seal_format import NOISE_BOUND
from secagg.errors import ConfigError, PayloadError


def _changes(draw, count: int, size: int, edge: bool) -> list[tuple[float, np.ndarray]]:
    """Random clients' (weight, unweighted change); at the edge every value sits just below a
    power of two, all of one sign, which is where the agreed steps are tightest."""
    weights = np.asarray(draw(st.lists(st.floats(0.01, 1.0), min_size=count, max_size=count)))
    weights = weights / weights.sum()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = []
    for w in weights:
        if edge:
            exponent = int(rng.integers(-30, 10))
            out.append((float(w), np.full(size, (2.0**exponent) * (1 - 2.0**-40))))
        else:
            out.append((float(w), rng.normal(0, 0.3, size) * 10.0 ** rng.integers(-6, 3)))
    return out


@st.composite
def rounds(draw) -> list[tuple[float, np.ndarray]]:
    count = draw(st.integers(1, PACKED.max_clients))
    size = draw(st.integers(1, 40))
    return _changes(draw, count, size, edge=draw(st.booleans()))


def _quantized(
    clients: list[tuple[float, np.ndarray]], packing: PackedParams = PACKED
) -> list[np.ndarray]:
    """The round's protocol: histograms of the weighted changes summed (a client reports its
    change times its sample count, and the total divides: weights here, a total of 1), steps
    agreed, every client quantizes its weighted change."""
    sizes = np.array([clients[0][1].size])
    summed = np.sum([quantize.histogram(w * d, sizes) for w, d in clients], axis=0)
    steps = quantize.steps(summed, len(clients), packing.sum_limit)
    return [quantize.quantize(w * d, steps, sizes)[0] for w, d in clients]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=True) | st.sampled_from([0.0, -0.0]),
        min_size=1,
        max_size=60,
    ),
    st.integers(1, 10),
    st.integers(1, 10**6),
)
def test_a_histogram_of_scaled_values_needs_no_scaled_copy(values, blocks, samples) -> None:
    """A client reports the histogram of its change times its sample count: taken on the
    change with the count as a factor, every block lands in the very bin it did on the scaled
    copy (the steps every client derives must not move by a bit)."""
    change = np.array(values)
    cuts = np.linspace(0, change.size, min(blocks, change.size) + 1).astype(int)
    sizes = np.diff(cuts)
    sizes = sizes[sizes > 0]
    assert np.array_equal(
        quantize.histogram(change, sizes, samples), quantize.histogram(change * samples, sizes)
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
        | st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.5, -2.5]),
        min_size=1,
        max_size=60,
    ),
    st.lists(st.floats(1e-12, 1e3), min_size=1, max_size=10),
    st.floats(1e-3, 1e300),
)
def test_quantizing_in_one_pass_is_numpys_clip_divide_and_rint(values, steps, limit) -> None:
    """Clients quantize in one compiled pass; every client must get numpy's integers bit for
    bit (clipping and its count, ties rounded to even, NaN kept), and dequantize alike."""
    change = np.array(values)
    cuts = np.linspace(0, change.size, min(len(steps), change.size) + 1).astype(int)
    sizes = np.diff(cuts)
    block_steps = np.array(steps[: sizes.size])
    expected = np.clip(change, -limit, limit) / np.repeat(block_steps, sizes)
    clipped = int(np.count_nonzero(change > limit) + np.count_nonzero(change < -limit))
    got, count = quantize.quantize(change.copy(), block_steps, sizes, limit)
    assert np.array_equal(got, np.rint(expected), equal_nan=True) and count == clipped
    scaled = quantize.dequantize(got.copy(), block_steps, sizes)
    assert np.array_equal(scaled, got * np.repeat(block_steps, sizes), equal_nan=True)


def test_quantizing_refuses_blocks_that_do_not_cover_the_values() -> None:
    with pytest.raises(ValueError, match="2 blocks of 7 values for 8"):
        quantize.quantize(np.zeros(8), np.ones(2), np.array([4, 3]))
    with pytest.raises(ValueError, match="float64"):
        quantize.dequantize(np.zeros(8, dtype=np.float32), np.ones(2), np.array([4, 4]))


@settings(max_examples=200, deadline=None)
@given(rounds(), st.sampled_from(PACKINGS))
def test_agreed_steps_never_overflow_and_sums_unpack_exactly(clients, packing) -> None:
    quantized = _quantized(clients, packing)
    total = np.sum(quantized, axis=0)
    assert np.abs(total).max() <= packing.sum_limit  # the headroom holds, whatever the clients
    slots = sum(oracles.pack(packing, q, np.array([0])).astype(np.int64) for q in quantized)
    values, _ = oracles.unpack(packing, slots.astype(np.float64), total.size, 1)
    assert np.array_equal(values, total)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.sampled_from([-1.0, 1.0]))
def test_max_clients_at_the_overflow_edge_still_unpack_exactly(size: int, sign: float) -> None:
    """128 clients of equal weight, each at the largest change its exponent allows, all of one
    sign: the sum comes within a few units of the digit's limit and never past it."""
    weight = 1.0 / PACKED.max_clients
    change = np.full(size, sign * (1 - 2.0**-40))
    quantized = _quantized([(weight, change) for _ in range(PACKED.max_clients)])
    total = np.sum(quantized, axis=0)
    assert PACKED.sum_limit - PACKED.max_clients <= np.abs(total).min()
    assert np.abs(total).max() <= PACKED.sum_limit
    slots = sum(oracles.pack(PACKED, q, np.array([0])).astype(np.int64) for q in quantized)
    values, _ = oracles.unpack(PACKED, slots.astype(np.float64), size, 1)
    assert np.array_equal(values, total)


@pytest.mark.parametrize(
    ("packing", "pattern"),
    [
        ("standard", "plus"),
        ("standard", "minus"),
        ("standard", "mixed"),
        ("fine", "plus"),
        ("fine", "mixed"),
        ("wide", "mixed"),
    ],
)
def test_max_clients_at_the_edge_decrypt_exactly_through_ckks(
    ckks_pair, session_keys, packing, pattern
) -> None:
    """max_clients real ciphertexts, every value at its limit: the sum decrypts exactly, for
    the standard packing (128 clients, 15-bit digits), the fine one (128 clients, 23-bit
    digits) and the wide one (1,024 clients, 21-bit digits).

    All but one client send the *same* vector, so every ciphertext's noise is drawn afresh
    while the digits add up coherently to the edge of their range.
    """
    from secagg import keys
    from secagg.crypto.ckks import CkksClient
    from secagg.crypto.ckks_server import CkksServer
    from secagg.crypto.packing import FINE, WIDE

    params = {"standard": PACKED, "fine": FINE, "wide": WIDE}[packing]
    client, server = ckks_pair
    if packing == "fine":
        client = CkksClient(keys.load_for_client(session_keys), precision="fine")
        server = CkksServer(keys.load_for_server(session_keys), precision="fine")
    count = params.max_clients
    weight = 1.0 / count
    rng = np.random.default_rng(3)
    signs = {"plus": 1.0, "minus": -1.0, "mixed": rng.choice([-1.0, 1.0], 12_000)}[pattern]
    bound = params.sum_limit
    edge = np.full(12_000, np.floor(weight * bound)) * signs
    ups = [Update(edge, weight) for _ in range(count - 1)]
    ups.append(Update(np.rint(rng.uniform(-1, 1, 12_000) * np.floor(weight * bound)), weight))
    stamp = round_of(1, roster=count)
    total = client.decrypt(server.sum(encrypt_all(client, ups, stamp), stamp), stamp)
    assert np.array_equal(total.values, np.sum([u.values for u in ups], axis=0))
    assert total.weight == pytest.approx(1.0, abs=1e-8)


def test_too_many_clients_for_the_headroom_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="at most 1024 clients"):
        PACKED.check_clients(1025)
    with pytest.raises(ConfigError, match="at most 1024 clients"):
        RunConfig(he=True, clients=2000).validate()
    RunConfig(he=True, clients=5000, clients_per_round=1000).validate()
    RunConfig(he=False, clients=200).validate()  # plaintext FedAvg has no such limit


def test_settings_that_could_wrap_or_lose_digits_are_refused() -> None:
    with pytest.raises(ConfigError, match="data prime"):
        PackedParams(values_per_slot=3, digit_bits=15, scale_bits=16).check(60)
    with pytest.raises(ConfigError, match="too small"):
        PackedParams(scale_bits=10).check(60)
    with pytest.raises(ConfigError, match="too small"):
        PackedParams(max_clients=100_000).check(60)
    for packing in PACKINGS:
        packing.check(60)


def test_noise_model_matches_measured_fresh_noise(session_keys) -> None:
    """The headroom rests on the noise bound: decrypt fresh encryptions of zero and look at
    the noise itself (SEAL's centered binomial: standard deviation sqrt(21 / 2), never
    beyond 21)."""
    from secagg import keys
    from secagg.crypto import rlwe, seal_format, seeded

    context = keys.load_for_client(session_keys).context
    secret = rlwe.SecretKey(context, seal_format.shape_of_context(context))
    seed = seeded.fresh_seed()
    noise = secret.decrypt(secret.encrypt_zero(seed, 8), (seed,))
    assert np.abs(noise).max() <= NOISE_BOUND
    # Centered: the mean within 5 standard errors of 0 (a false alarm once in 1.7 million).
    assert abs(noise.mean()) < 5 * np.sqrt(NOISE_BOUND / 2 / noise.size)
    assert 0.97 < noise.std() / np.sqrt(NOISE_BOUND / 2) < 1.03
    assert np.abs(noise).max() >= 12  # not all zeros: 65,536 draws reach past 12 sigma/3


def test_noise_is_the_centered_binomial_and_fresh_every_call() -> None:
    """The noise (``oracles.noise``, which the one-pass kernel draws bit for bit: next test)
    against the exact distribution of (21 fair bits) - (21 fair bits): a
    chi-square test over every value expected 5 times or more (false alarm about 1e-6), and
    two calls never the same draw (a fresh key each)."""
    from math import comb

    draws = oracles.noise((64, 8192))
    values, counts = np.unique(draws, return_counts=True)
    b = NOISE_BOUND

    def expected(k: int) -> float:
        ways = sum(comb(b, i) * comb(b, i - k) for i in range(max(0, k), min(b, b + k) + 1))
        return draws.size * ways / 4**b

    cells = [(c, expected(int(v))) for v, c in zip(values, counts, strict=True)]
    cells = [(c, e) for c, e in cells if e >= 5]
    chi2 = sum((c - e) ** 2 / e for c, e in cells)
    assert len(cells) >= 25
    assert chi2 < 80  # 1e-6 tail of chi-square with about 30 degrees of freedom
    assert not np.array_equal(oracles.noise((4, 8192)), oracles.noise((4, 8192)))


def test_encryptions_of_zero_in_one_pass_add_the_references_noise() -> None:
    """``encrypt_zero``'s compiled pass (``-a s + e mod q``) against numpy: the noise that
    ``oracles.noise_of`` reads from the same key-stream words, added to ``q - a s`` in Python
    integers; products at 0 and q - 1 and words at all-ones included (the wrap-arounds)."""
    from secagg.crypto import rlwe

    q = (1 << 60) - (1 << 14) + 1  # an NTT-friendly prime below 2**60, as keygen picks
    rng = np.random.default_rng(9)
    product = rng.integers(0, q, 50_000, dtype=np.uint64)
    words = rng.integers(0, 2**64, 50_000, dtype=np.uint64)
    product[:4] = [0, q - 1, 0, q - 1]
    words[:4] = [2**64 - 1, 2**64 - 1, (1 << NOISE_BOUND) - 1, (1 << NOISE_BOUND) - 1]
    noise = oracles.noise_of(words)
    expected = [(q - int(p) + int(e)) % q for p, e in zip(product, noise, strict=True)]
    out = product.copy()
    rlwe.zero_from(out, words, NOISE_BOUND, q)
    assert out.tolist() == expected
    assert noise[2] == NOISE_BOUND and noise[0] == 0 and int(out[2]) == NOISE_BOUND


def test_coefficients_off_by_more_than_the_noise_allows_are_refused() -> None:
    """A forged ciphertext shifts coefficients by less than half a unit of Delta: the hard
    noise bound (21 per summed client) catches it, and honest noise at the bound passes;
    non-zero padding is refused too."""
    rng = np.random.default_rng(11)
    clients, values, tail = 3, np.array([5.0, -7.0, 1234.0]), np.array([9.0])
    for noise in (NOISE_BOUND * clients, -NOISE_BOUND * clients):
        honest = _phase(rng, PACKED, values, tail, clients, noise=noise)
        digits, whole = _opened(*honest, PACKED, clients, 3, 1)
        assert np.array_equal(digits, values) and np.array_equal(whole, tail)
    for forged in (
        _phase(rng, PACKED, values, tail, clients, noise=NOISE_BOUND * clients + 1),
        _phase(rng, PACKED, values, tail, clients, noise=1 << (PACKED.scale_bits - 2)),
        _phase(rng, PACKED, values, tail, clients, pad=1),
    ):
        assert _opened(*forged, PACKED, clients, 3, 1) == "not-integer"


def test_quantization_error_is_within_the_stated_bound() -> None:
    """README's precision statement: at most c/2 steps per summed value, typically
    sqrt(c/12) steps, about 1e-4 of a block's largest change for 8 similar clients (15-bit
    digits)."""
    rng = np.random.default_rng(5)
    clients, size = 8, 40_000
    weights = rng.dirichlet(np.full(clients, 5.0))
    common = rng.normal(0, 0.01, size)
    changes = [common + rng.normal(0, 0.002, size) for _ in weights]
    sizes = np.array([quantize.BLOCK] * (size // quantize.BLOCK) + [size % quantize.BLOCK])
    samples = np.rint(weights * 10_000).astype(int)  # each client's count, the total N
    summed = np.sum(
        [quantize.histogram(n * d, sizes) for n, d in zip(samples, changes, strict=True)], axis=0
    )
    steps = quantize.steps(summed, clients, PACKED.sum_limit, samples.sum())
    updates = [n / samples.sum() * d for n, d in zip(samples, changes, strict=True)]
    total = np.sum([quantize.quantize(v.copy(), steps, sizes)[0] for v in updates], axis=0)
    back = quantize.dequantize(total, steps, sizes)
    exact = np.sum(updates, axis=0)
    in_steps = np.abs(back - exact) / np.repeat(steps, sizes)
    assert in_steps.max() <= clients / 2
    assert 0.6 < np.sqrt(np.mean(in_steps**2)) < 1.0  # sqrt(8 / 12) = 0.82
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    largest = np.repeat(np.maximum.reduceat(np.abs(exact), starts), sizes)
    typical = np.sqrt(np.mean((np.abs(back - exact) / largest) ** 2))
    assert 5e-5 < typical < 3e-4


# --- the compiled passes the clients run are the numpy reference, word for word ---------------

Q = (1 << 60) - (1 << 14) + 1  # a 60-bit NTT prime, like the keys' data prime
N = 64


def _digits(rng: np.random.Generator, packing: PackedParams, size: int, low: int) -> np.ndarray:
    """Random digits in ``[low, digit_limit)`` with the range's ends (and the balanced split's
    ties) among them: a client packs down to ``-digit_limit + 1``, a sum reaches one lower."""
    limit = packing.digit_limit
    digits = rng.integers(low, limit, size).astype(np.float64)
    edges = [low, limit - 1, 0, -1, limit // 2, -(limit // 2)]
    digits[: min(size, 6)] = edges[: min(size, 6)]
    return digits


def _packed(packing: PackedParams, values: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Slot integers (int64) of digits and tail, by plain integer arithmetic."""
    k = packing.values_per_slot
    flat = np.zeros(-(-values.size // k) * k, dtype=np.int64)
    flat[: values.size] = values
    powers = np.int64(1) << (packing.digit_bits * np.arange(k, dtype=np.int64))
    return np.concatenate([flat.reshape(-1, k) @ powers, tail.astype(np.int64)])


@pytest.mark.parametrize("packing", PACKINGS, ids=lambda p: f"{p.values_per_slot}x{p.digit_bits}")
def test_the_packing_pass_adds_what_pack_and_encode_make(packing) -> None:
    """``codec.pack_add`` against the numpy oracles, bit for bit; what it refuses it names,
    the first offending value, where the oracle refuses too."""
    from secagg.crypto import codec
    from secagg.crypto.seal_format import add_mod

    rng = np.random.default_rng(packing.digit_bits)
    for size in (1, 2, 3, 100, 301):
        # one client's digits stay within the packing's limits (a sum's do too)
        values = _digits(rng, packing, size, -packing.digit_limit + 1)
        limit = packing.tail_limit
        tail = np.array([limit - 1, -limit + 1, 0.0, rng.integers(-limit, limit)])
        slots = packing.slots_for(size, tail.size)
        count = -(-slots // N)
        c0 = rng.integers(0, Q, (count, N), dtype=np.uint64)
        expected = c0.copy()
        message = oracles.encode(
            oracles.pack(packing, values, tail).astype(np.int64), count, N, packing.scale_bits, Q
        )
        add_mod(expected, message, Q)
        codec.pack_add(c0.reshape(-1), values, tail, packing, Q)
        assert np.array_equal(c0, expected)
    words = np.zeros(N, dtype=np.uint64)
    limit = packing.digit_limit
    for bad, named in (
        (np.nan, "quantized value is NaN or infinite"),
        (np.inf, "quantized value is NaN or infinite"),
        (0.5, "quantized values must be integers"),
        (limit, f"quantized value {limit} is outside the packable range of \\+-{limit - 1}"),
        (-limit - 1.0, f"quantized value {limit + 1} is outside the packable range"),
    ):
        with pytest.raises(PayloadError, match=named):
            codec.pack_add(words, np.array([1.0, bad]), np.zeros(1), packing, Q)
        with pytest.raises(PayloadError, match=named):
            oracles.pack(packing, np.array([1.0, bad]), np.zeros(1))
    for bad, named in (
        (np.nan, "tail value is NaN"),
        (0.5, "tail values must be integers"),
        (packing.tail_limit, "tail value .* is outside the packable range"),
    ):
        with pytest.raises(PayloadError, match=named):
            codec.pack_add(words, np.ones(2), np.array([bad]), packing, Q)
        with pytest.raises(PayloadError, match=named):
            oracles.pack(packing, np.ones(2), np.array([bad]))


def _phase(rng, packing, values, tail, contributors, *, noise=None, pad=0):  # type: ignore[no-untyped-def]
    """(c0, c1 s) words whose decryption is the packed ``values`` and ``tail`` at scale, plus
    noise of ``contributors`` ciphertexts (one coefficient's exactly ``noise`` when given),
    and ``pad`` in the first padding coefficient."""
    slots = _packed(packing, values, tail)
    count = -(-(slots.size + 1) // N)
    plain = np.zeros(count * N, dtype=np.int64)
    plain[: slots.size] = slots << packing.scale_bits
    bound = NOISE_BOUND * contributors
    plain += rng.integers(-bound, bound + 1, plain.size)
    if noise is not None:
        at = rng.integers(0, slots.size)
        plain[at] = (slots[at] << packing.scale_bits) + noise
    plain[slots.size] += pad << packing.scale_bits
    product = rng.integers(0, Q, count * N, dtype=np.uint64)
    words = (plain % Q).astype(np.uint64)  # numpy's % by a positive modulus: in [0, Q)
    c0 = (words + (np.uint64(Q) - product)) % np.uint64(Q)
    return c0.reshape(count, N), product.reshape(count, N)


def _reference(c0, product, packing, clients, values, tail):  # type: ignore[no-untyped-def]
    """What the oracles read (``SecretKey.decrypt``'s sum, ``decode``, ``unpack``), or the
    reason they refuse."""
    from secagg.crypto.seal_format import add_mod

    phase = product.copy()
    add_mod(phase, c0, Q)
    centered = phase.view(np.int64)
    centered[phase > np.uint64(Q // 2)] -= Q
    try:
        slots = oracles.decode(
            centered, packing.scale_bits, clients, packing.slots_for(values, tail)
        )
        return oracles.unpack(packing, slots.astype(np.float64), values, tail)
    except PayloadError as err:
        return err.reason


def _opened(c0, product, packing, clients, values, tail):  # type: ignore[no-untyped-def]
    """What ``codec.open_sum`` reads, or the reason it refuses."""
    from secagg.crypto import codec

    try:
        return codec.open_sum(c0, product, Q, clients, packing, values, tail)
    except PayloadError as err:
        return err.reason


@pytest.mark.parametrize("packing", PACKINGS, ids=lambda p: f"{p.values_per_slot}x{p.digit_bits}")
def test_the_opening_pass_reads_what_decrypt_decode_and_unpack_read(packing) -> None:
    """Honest sums (digits within +-(limit - 1), tails at their limits, the noise of the most
    clients) read back exactly; slots drawn over the whole range, in range or not, get the
    oracles' verdict; too much noise and non-zero padding are not integers."""
    rng = np.random.default_rng(packing.scale_bits)
    clients = packing.max_clients
    for size in (1, 2, 3, 100, 301):
        values = _digits(rng, packing, size, -packing.digit_limit + 1)
        tail = np.array([packing.tail_limit - 1, -packing.tail_limit + 1, 7.0])
        c0, product = _phase(rng, packing, values, tail, clients)
        digits, whole = _opened(c0, product, packing, clients, size, 3)
        assert np.array_equal(digits, values) and np.array_equal(whole, tail)
        assert all(
            map(np.array_equal, (digits, whole), _reference(c0, product, packing, clients, size, 3))
        )
    seen = set()
    for trial in range(300):
        size = int(rng.integers(1, 12))
        # any slot integer an aggregate might hold: digits up to twice the limit (overflow)
        spread = packing.digit_limit * (1 if trial % 3 else 2)
        values = rng.integers(-spread, spread, size).astype(np.float64)
        c0, product = _phase(rng, packing, values, np.zeros(3), 1)
        read = _opened(c0, product, packing, 1, size, 3)
        expected = _reference(c0, product, packing, 1, size, 3)
        if isinstance(expected, str):
            assert read == expected
        else:
            assert np.array_equal(read[0], expected[0]) and np.array_equal(read[1], expected[1])
        seen.add(read if isinstance(read, str) else "ok")
    assert seen == {"ok", "out-of-range"}
    values, tail = _digits(rng, packing, 50, -packing.digit_limit + 1), np.zeros(3)
    noisy = _phase(rng, packing, values, tail, 1, noise=NOISE_BOUND * clients + 1)
    padded = _phase(rng, packing, values, tail, 1, pad=1)
    for c0, product in (noisy, padded):
        assert _opened(c0, product, packing, clients, 50, 3) == "not-integer"
        assert _reference(c0, product, packing, clients, 50, 3) == "not-integer"
