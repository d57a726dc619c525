"""Pairwise masks inside the ciphertexts (``secagg.crypto.masking``).

The masks must cancel in the server's unmasked sum (the aggregate decrypts bit for bit as
without them), make one client's ciphertext unreadable to another key holder, survive dropouts
before upload, after it and while the round unmasks (keys rebuilt from shares), refuse a late
update, and refuse a substituted key. Against a lying server: a false dropout claim leaves the
victim's self-mask on, and the clients refuse sums below the round policy's threshold and
survivor sets shown differently to different sites.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import round_of, update_for
from hostile import forge_aggregate
from scipy import stats

from secagg import keys
from secagg.crypto import Update, masking, rlwe, seal_format
from secagg.crypto.ckks import CkksClient
from secagg.crypto.envelope import AGGREGATE, UPDATE, UPDATE_PHASE
from secagg.crypto.masking import Masker, MaskPlan, MaskRoster, SignedKey, SimulatedIdentities
from secagg.crypto.packing import packing_for
from secagg.crypto.policy import RoundPolicy
from secagg.crypto.seal_format import from_wire
from secagg.errors import PayloadError
from secagg.server import Server
from secagg.transport.inprocess import InProcessTransport

#: Significance of the uniformity tests: a masked ciphertext fails one by chance once in 1000.
ALPHA = 1e-3
CLIENTS = 3


@pytest.fixture(scope="module")
def identities() -> SimulatedIdentities:
    return SimulatedIdentities()


def _clients(session_keys, identities, masked: bool = True, threshold: int = 2) -> list[CkksClient]:  # type: ignore[no-untyped-def]
    """Three clients; masked ones enforce a threshold of 2 (so one dropout is survivable)."""
    return _policed(session_keys, identities, CLIENTS, threshold, masked)


def _policed(
    session_keys, identities, size: int, threshold: int, masked: bool = True
) -> list[CkksClient]:  # type: ignore[no-untyped-def]
    loaded = keys.load_for_client(session_keys)
    policy = RoundPolicy(threshold, size)
    return [
        CkksClient(
            loaded,
            Masker(identities.signer, identities.verifier, policy=policy) if masked else None,
        )
        for _ in range(size)
    ]


def _agree(clients: list[CkksClient], stamp, sites=(10, 11, 12), nonce=b"") -> MaskRoster:  # type: ignore[no-untyped-def]
    """Each client's job key, then an attempt: every client advertises, and the train task
    relays the adverts and each client's sealed shares."""
    peers = [c.masker.publish(stamp.job, site) for c, site in zip(clients, sites, strict=True)]  # type: ignore[union-attr]
    return _attempt(clients, stamp, peers, nonce)


def _attempt(clients, stamp, peers: list[SignedKey | None], nonce: bytes) -> MaskRoster:  # type: ignore[no-untyped-def]
    advertised = [
        c.masker.advertise(stamp.for_sender(p), peers, nonce) for p, c in enumerate(clients)
    ]
    roster = MaskRoster.of(stamp.job, nonce, peers, advertised, None)
    for position, client in enumerate(clients):
        client.masker.agree(  # type: ignore[union-attr]
            stamp.for_sender(position), roster.adverts, roster.sealed_to(position), nonce
        )
    return roster


def _updates(client: CkksClient, n: int = 3000, seed: int = 4) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [update_for(client, rng.integers(-500, 500, n), 1 / CLIENTS) for _ in range(CLIENTS)]


def _encrypt(clients: list[CkksClient], updates: list[Update], stamp) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [
        c.encrypt(u, stamp.for_sender(i))
        for i, (c, u) in enumerate(zip(clients, updates, strict=True))
    ]


def _reveals(clients, stamp, survivors):  # type: ignore[no-untyped-def]
    """The consistency round, then each survivor's reveal, as the round loop runs them."""
    signed = {p: clients[p].confirm(stamp.for_sender(p), survivors) for p in survivors}
    return [clients[p].reveal(stamp.for_sender(p), survivors, signed) for p in survivors]


def _unmask(clients, server, summed, stamp, survivors, roster):  # type: ignore[no-untyped-def]
    return server.corrected(summed, _reveals(clients, stamp, survivors), stamp, roster)


def test_masks_cancel_and_the_sum_decrypts_bit_identically(
    session_keys, identities, ckks_pair
) -> None:
    _, server = ckks_pair
    stamp = round_of(1, roster=CLIENTS)
    masked, plain = _clients(session_keys, identities), _clients(session_keys, identities, False)
    roster = _agree(masked, stamp)
    updates = _updates(plain[0])
    summed = server.sum(_encrypt(masked, updates, stamp), stamp)
    unmasked = _unmask(masked, server, summed, stamp, (0, 1, 2), roster)
    with_masks = masked[1].decrypt(unmasked, stamp)
    without = plain[1].decrypt(server.sum(_encrypt(plain, updates, stamp), stamp), stamp)
    assert with_masks.values.tobytes() == without.values.tobytes()
    assert (with_masks.weight, with_masks.contributors) == (without.weight, without.contributors)
    # Both phases are masked (their own PRG streams): the scale exchange cancels too.
    scales = stamp.scales()
    masked_sum = server.sum(_encrypt(masked, updates, scales), scales)
    # Each client's self-mask is still on until the survivors reveal their keys.
    with pytest.raises(PayloadError):
        masked[0].decrypt(masked_sum, scales)
    masked_sum = _unmask(masked, server, masked_sum, scales, (0, 1, 2), roster)
    assert masked[0].decrypt(masked_sum, scales).values.tobytes() == without.values.tobytes()


def _slot_low_bits(session_keys, payload: bytes, client: CkksClient, stamp) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What a key holder decrypts from one client's update: every slot (coefficient), rounded,
    mod 256."""
    opened = client._format.open(payload, stamp, UPDATE)
    n = client._shape.poly_modulus_degree
    c0 = from_wire(opened.body, client._shape.modulus).reshape(opened.blob_count, n)
    context = keys.load_for_client(session_keys).context
    phase = rlwe.SecretKey(context, client._shape).decrypt(c0, opened.seeds)
    bits = packing_for(stamp.roster).scale_bits
    return ((phase + (1 << (bits - 1))) >> bits).reshape(-1) % 256


def test_another_clients_ciphertext_decrypts_to_uniform_lanes(session_keys, identities) -> None:
    """Client 1, holding the shared secret key and the server's whole view (client 0's
    payload, its seed), decrypts client 0's update: with masks the low 8 bits of every slot
    pass a chi-square test of uniformity at ALPHA; without masks the same test rejects them
    (the update is all zeros: the slots are the packed digits, in the clear)."""
    stamp = round_of(1, roster=CLIENTS)
    update = Update(np.zeros(20_000), 1 / CLIENTS)
    masked = _clients(session_keys, identities)
    _agree(masked, stamp)
    seen = _slot_low_bits(
        session_keys, masked[0].encrypt(update, stamp.for_sender(0)), masked[1], stamp
    )
    counts = np.bincount(seen, minlength=256)
    assert stats.chisquare(counts).pvalue > ALPHA, counts
    plain = _clients(session_keys, identities, False)[0]
    clear = _slot_low_bits(session_keys, plain.encrypt(update, stamp.for_sender(0)), plain, stamp)
    assert stats.chisquare(np.bincount(clear, minlength=256)).pvalue < 1e-100


def test_a_dropout_before_upload_has_its_pairs_removed_and_the_sum_is_exact(
    session_keys, identities, ckks_pair
) -> None:
    """Client 1 advertised its keys and sent nothing: the survivors reveal their shares of its
    mask key (never of its self-mask key), the server rebuilds the key and takes its pairs
    off, and the sum decrypts exactly to the survivors' updates."""
    _, server = ckks_pair
    stamp = round_of(2, roster=CLIENTS)
    clients = _clients(session_keys, identities)
    roster = _agree(clients, stamp)
    updates = _updates(clients[0], seed=7)
    payloads = _encrypt(clients, updates, stamp)
    summed = server.sum([payloads[0], payloads[2]], stamp)
    # Client 1's pairs do not cancel: the sum decrypts to noise, which the unpacker refuses.
    with pytest.raises(PayloadError):
        clients[0].decrypt(summed, stamp)
    reveals = _reveals(clients, stamp, (0, 2))
    assert all(set(r.lost) == {1} and 1 not in r.shares for r in reveals)
    fixed = server.corrected(summed, reveals, stamp, roster)
    total = clients[2].decrypt(fixed, stamp)
    assert total.contributors == (0, 2)
    assert np.array_equal(total.values, updates[0].values + updates[2].values)
    # One reveal alone holds one share of each key, below the threshold of 2: named, not
    # garbage.
    with pytest.raises(PayloadError, match="do not rebuild") as caught:
        server.corrected(summed, reveals[:1], stamp, roster)
    assert caught.value.reason == "missing-correction"


def test_a_late_update_after_unmasking_is_refused(session_keys, identities, ckks_pair) -> None:
    _, cipher = ckks_pair
    stamp = round_of(3, roster=CLIENTS)
    clients = _clients(session_keys, identities)
    roster = _agree(clients, stamp)
    payloads = _encrypt(clients, _updates(clients[0]), stamp)
    server = Server(cipher, masking=True)
    summed = server.sum([payloads[0], payloads[2]], stamp, 3000)
    server.correct(summed, _reveals(clients, stamp, (0, 2)), stamp, roster)
    # By round state: the server adds nothing more to an unmasked phase.
    with pytest.raises(PayloadError, match="late update is never added") as caught:
        server.sum([payloads[1]], stamp, 3000)
    assert caught.value.reason == "late-update"
    # By the ledger: a server that adds it anyway must list it, and the clients refuse that.
    forged = forge_aggregate(cipher, payloads, stamp, (0, 1, 2))
    with pytest.raises(PayloadError, match=r"adds client\(s\) \[1\] after the round was unmasked"):
        clients[0].decrypt(forged, stamp)
    # Nor does a client confirm a second survivor set (which could strip an added client).
    with pytest.raises(PayloadError, match="two survivor sets") as caught:
        clients[0].confirm(stamp.for_sender(0), (0, 1, 2))
    assert caught.value.reason == "inconsistent"


def test_a_substituted_key_agreement_key_is_refused(session_keys, identities) -> None:
    stamp = round_of(4, roster=CLIENTS)
    clients = _clients(session_keys, identities)
    peers = [c.masker.publish(stamp.job, 20 + i) for i, c in enumerate(clients)]  # type: ignore[union-attr]
    # The server swaps client 2's key for one of its own, signed by a key that is not site 22's.
    mallory = Masker(SimulatedIdentities().signer, identities.verifier).publish(stamp.job, 22)
    for forged in (mallory, replace(mallory, signature=peers[2].signature)):
        with pytest.raises(PayloadError, match="not signed by its site key") as caught:
            clients[0].masker.advertise(stamp.for_sender(0), [*peers[:2], forged], b"")  # type: ignore[union-attr]
        assert caught.value.reason == "bad-key"
    # Another job's signed key is no good either: signatures bind the job.
    other_job = bytes(16)
    assert other_job != stamp.job
    other = clients[2].masker.publish(other_job, 22)  # type: ignore[union-attr]
    with pytest.raises(PayloadError, match="not signed"):
        clients[0].masker.advertise(stamp.for_sender(0), [*peers[:2], other], b"x")  # type: ignore[union-attr]


def test_substituted_or_replayed_attempt_keys_are_refused(session_keys, identities) -> None:
    """An attempt's keys are signed over the job, round and attempt nonce: keys the server
    made itself, or a site's genuine keys of another attempt, are refused by name before
    anything is masked."""
    stamp = round_of(4, roster=CLIENTS)
    clients = _clients(session_keys, identities)
    peers = [c.masker.publish(stamp.job, 25 + i) for i, c in enumerate(clients)]  # type: ignore[union-attr]
    earlier = _attempt(clients, stamp, peers, b"one")
    advertised = [
        c.masker.advertise(stamp.for_sender(p), peers, b"two")  # type: ignore[union-attr]
        for p, c in enumerate(clients)
    ]
    genuine = [a.advert for a in advertised]
    mallory = replace(genuine[2], publics=bytes(range(96)))
    for swapped in (earlier.adverts[2], mallory):
        with pytest.raises(PayloadError, match="site 27's attempt keys are not signed") as caught:
            clients[0].masker.agree(  # type: ignore[union-attr]
                stamp.for_sender(0), [genuine[0], genuine[1], swapped], {}, b"two"
            )
        assert caught.value.reason == "bad-key"
    # A client's own keys swapped for another's stop it at once.
    with pytest.raises(PayloadError, match="not its own") as caught:
        clients[0].masker.agree(  # type: ignore[union-attr]
            stamp.for_sender(0), [genuine[1], genuine[1], genuine[2]], {}, b"two"
        )
    assert caught.value.reason == "bad-key"


# --- whole rounds and jobs ------------------------------------------------------------------


class _Dropping(InProcessTransport):
    """Position ``who`` leaves the round at ``when``: ``keys`` (it advertised its keys and
    trained, but sends nothing), ``update`` (it sent its scales, not its update), ``apply``
    (it sent everything and never takes the aggregate), ``unmask`` (it confirmed, then
    vanished before revealing), ``lies`` (it reveals another key than it committed to), or
    ``combined``: ``keys``, and position ``who + 1`` vanishes while the scale exchange
    unmasks (its pairs with ``who`` no one but the two of them could remove)."""

    def __init__(self, slots, when: str, who: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(slots)
        self.when, self.who = when, who
        self.lost = who + 1 if when == "combined" else None

    def train(self, round_stamp):  # type: ignore[no-untyped-def]
        replies = super().train(round_stamp)
        silent = self.when in ("keys", "combined")
        return [r for r in replies if not (silent and r.client_id == self.who)]

    def seal(self, round_stamp, total_samples, scales):  # type: ignore[no-untyped-def]
        skipped = {self.lost, self.who if self.when in ("keys", "update", "combined") else None}
        for position, slot in enumerate(self.slots):
            if position not in skipped:
                yield slot.seal(round_stamp.for_sender(position), total_samples, scales)

    def apply(self, round_stamp, payload, scales):  # type: ignore[no-untyped-def]
        gone = {self.who} if self.when == "apply" else {self.lost}
        keep = [s for p, s in enumerate(self.slots) if p not in gone]
        return [s.apply(payload, round_stamp, scales) for s in keep]

    def evaluate(self, stamp):  # type: ignore[no-untyped-def]
        return [e for e in super().evaluate(stamp) if e.client_id != self.lost]

    def unmask(self, stamp, survivors):  # type: ignore[no-untyped-def]
        reveals = super().unmask(stamp, survivors)
        if self.when in ("unmask", "combined"):  # it vanished after confirming
            lost = self.who if self.when == "unmask" else self.lost
            return [r for r in reveals if r.sender != lost]
        if self.when == "lies":  # it reveals another key than the one it committed to
            return [replace(r, key=bytes(32)) if r.sender == self.who else r for r in reveals]
        return reveals


def _one_round(session_keys, masking: bool, when: str):  # type: ignore[no-untyped-def]
    from secagg import rounds
    from secagg.builtin import task_for
    from secagg.config import RunConfig
    from secagg.crypto import for_server
    from secagg.job import build_clients

    config = RunConfig(
        clients=5,
        he=True,
        masking=masking,
        threshold=3,
        keys_dir=str(session_keys),
        tracking=False,
        device="cpu",
        local_epochs=1,
    )
    transport = _Dropping(build_clients(config, task_for(config)), when, who=1)
    server = Server(for_server(True, session_keys), masking=masking)
    metrics, _ = rounds.run_round(server, transport, rounds.round_stamp(bytes(16), 1, 5))
    return metrics, transport.slots[0].global_vector


@pytest.mark.parametrize("when", ["keys", "update", "apply", "unmask", "lies", "combined"])
def test_a_dropout_leaves_the_same_model_as_without_masks(session_keys, when: str) -> None:
    """Client 1 drops after advertising its keys, after the scale exchange, after its upload,
    or while the round unmasks (it confirmed but never revealed its key), or reveals a key it
    did not commit to; or it drops before upload and client 2 vanishes while the round
    unmasks: keys rebuilt from the others' shares make the masked round's model (bit for
    bit) and metrics the unmasked round's over the same survivors."""
    masked, model = _one_round(session_keys, True, when)
    unmasked, reference = _one_round(session_keys, False, when)
    assert model.tobytes() == reference.tobytes()
    # The evaluation is unmasked the same way (its keys are shared too): the same metrics.
    assert masked.metrics and (masked.metrics, masked.loss) == (unmasked.metrics, unmasked.loss)
    expected = {"keys": 4, "update": 4, "combined": 3}.get(when, 5)
    assert masked.clients == unmasked.clients == expected
    # Adverts, shares, confirmations and keys are a few hundred bytes a client and phase,
    # dropouts or not.
    extra = (masked.bytes_up - unmasked.bytes_up) / unmasked.bytes_up
    assert 0 < extra < 0.02, extra


def test_the_digits_job_is_unchanged_by_masks(tmp_path, session_keys) -> None:
    """Masked HE equals unmasked HE exactly, and plaintext FedAvg within one test digit."""
    from secagg.config import RunConfig
    from secagg.job import run_job

    def job(name: str, **changes):  # type: ignore[no-untyped-def]
        config = RunConfig(
            clients=4,
            rounds=3,
            keys_dir=str(session_keys),
            tracking=False,
            device="cpu",
            output_dir=str(tmp_path / name),
        )
        return run_job(replace(config, **changes))

    masked, he, plain = job("m", he=True, masking=True), job("h", he=True, masking=False), job("p")
    for m, h, p in zip(masked.rounds, he.rounds, plain.rounds, strict=True):
        assert (m.value("accuracy"), m.loss) == (h.value("accuracy"), h.loss), f"round {m.round}"
        assert abs(m.value("accuracy") - p.value("accuracy")) <= 0.003, f"round {m.round}"
        # Confirmations, self-mask keys and relayed signatures: well under 2% of the bytes.
        assert 0 < m.bytes_up - h.bytes_up <= 0.02 * h.bytes_up
        assert 0 < m.bytes_down - h.bytes_down <= 0.02 * h.bytes_down


def test_masking_is_on_by_default_everywhere_and_ignored_without_he() -> None:
    from secagg.config import RunConfig

    assert RunConfig().masking
    for transport in ("inprocess", "ray", "grpc"):
        RunConfig(he=True, transport=transport).validate()
    # Plaintext FedAvg's server reads every update anyway: the setting changes nothing there.
    RunConfig(he=False, masking=True, transport="grpc").validate()


def test_sampled_rounds_mask_with_each_rounds_clients(tmp_path, session_keys) -> None:
    """Clients per round drawn from a larger population: reusable clients take on each round's
    identities (and their per-job keys); masked and unmasked runs give the same rounds."""
    from secagg.config import RunConfig
    from secagg.job import run_job

    config = RunConfig(
        he=True,
        clients=6,
        clients_per_round=3,
        rounds=3,
        keys_dir=str(session_keys),
        tracking=False,
        device="cpu",
    )
    runs = [
        run_job(replace(config, masking=m, output_dir=str(tmp_path / str(m))))
        for m in (True, False)
    ]
    for m, u in zip(runs[0].rounds, runs[1].rounds, strict=True):
        assert (m.value("accuracy"), m.loss) == (u.value("accuracy"), u.loss)
        assert u.bytes_up < m.bytes_up <= 1.02 * u.bytes_up  # confirmations and keys only


@pytest.mark.slow
def test_the_default_digits_job_with_masks_matches_plaintext_every_round(
    tmp_path, session_keys
) -> None:
    """The default job (8 clients, 10 rounds), masked HE against plaintext FedAvg."""
    from secagg.config import RunConfig
    from secagg.job import run_job

    base = RunConfig(keys_dir=str(session_keys), tracking=False, device="cpu")
    masked = run_job(replace(base, he=True, masking=True, output_dir=str(tmp_path / "m")))
    plain = run_job(replace(base, output_dir=str(tmp_path / "p")))
    assert masked.final >= 0.90
    for m, p in zip(masked.rounds, plain.rounds, strict=True):
        assert abs(m.value("accuracy") - p.value("accuracy")) <= 0.003, f"round {m.round}"


def test_a_phase_is_masked_once(session_keys, identities) -> None:
    """A second payload under the same masks (a retried round re-encrypting) would give away
    the difference of the two: the client refuses it by name."""
    stamp = round_of(5, roster=CLIENTS)
    clients = _clients(session_keys, identities)
    _agree(clients, stamp)
    update = _updates(clients[0])[0]
    clients[0].encrypt(update, stamp.for_sender(0))
    with pytest.raises(PayloadError, match="would reveal their difference") as caught:
        clients[0].encrypt(update, stamp.for_sender(0))
    assert caught.value.reason == "mask-reused"


# --- a lying server ---------------------------------------------------------------------------


def test_a_false_dropout_claim_leaves_the_victims_self_mask_on(
    session_keys, identities, ckks_pair
) -> None:
    """The server holds client 0's upload yet tells the others it dropped: they confirm the
    set without it and reveal their shares of its mask key, from which the server rebuilds
    the key and takes every pair off client 0's ciphertext. What is left still decrypts, for
    the colluding client 3, to uniform lanes: client 0 never revealed its self-mask key, and
    no survivor revealed a share of it. With that key the same view would decrypt to client
    0's update exactly."""
    _, server = ckks_pair
    stamp = round_of(6, roster=4)
    clients = _policed(session_keys, identities, 4, threshold=3)
    roster = _agree(clients, stamp, sites=(30, 31, 32, 33))
    update = Update(np.zeros(20_000), 1 / 4)
    victim = clients[0].encrypt(update, stamp.for_sender(0))
    survivors = (1, 2, 3)
    reveals = _reveals(clients, stamp, survivors)
    assert all(0 in r.lost and 0 not in r.shares for r in reveals)  # never both kinds
    # The server's whole view of client 0, with every one of its pairs removed.
    q = clients[0]._shape.modulus
    n = clients[0]._shape.poly_modulus_degree
    opened = clients[0]._format.open(server.sum([victim], stamp), stamp, AGGREGATE)
    words = from_wire(opened.body, q).copy()
    own = roster.adverts[0]
    assert own is not None
    key = masking._rebuilt_mask_key(0, reveals, own.public(UPDATE_PHASE))
    halves = []
    for peer in survivors:
        other = roster.adverts[peer]
        assert other is not None
        secret = masking._agreed(key, other.public(UPDATE_PHASE), own.public(UPDATE_PHASE), peer)
        halves.append(masking._prg_key(secret, stamp, roster.nonce))
    pairs = MaskPlan((), tuple(halves)).words(opened.blob_count, n, q)  # client 0 added them
    seal_format.add_mod(words, pairs.reshape(-1), q)
    seen = _low_bits_of(session_keys, clients[1], words, opened.seeds, stamp)
    assert stats.chisquare(np.bincount(seen, minlength=256)).pvalue > ALPHA
    # The self-mask is all that hides it: with client 0's own key the lanes are the zeros.
    self_key = clients[0].masker._current.self_keys[UPDATE_PHASE]  # type: ignore[union-attr]
    seal_format.add_mod(
        words, MaskPlan((), (self_key,)).words(opened.blob_count, n, q).reshape(-1), q
    )
    clear = _low_bits_of(session_keys, clients[1], words, opened.seeds, stamp)
    assert stats.chisquare(np.bincount(clear, minlength=256)).pvalue < 1e-100
    # And client 0, asked to unmask a set that leaves it out, refuses.
    with pytest.raises(PayloadError, match="leaves this site out"):
        clients[0].confirm(stamp.for_sender(0), survivors)


def _low_bits_of(session_keys, client, words, seeds, stamp) -> np.ndarray:  # type: ignore[no-untyped-def]
    n = client._shape.poly_modulus_degree
    context = keys.load_for_client(session_keys).context
    phase = rlwe.SecretKey(context, client._shape).decrypt(words.reshape(-1, n), seeds)
    bits = packing_for(stamp.roster).scale_bits
    return ((phase + (1 << (bits - 1))) >> bits).reshape(-1) % 256


def test_the_round_policy_refuses_small_rounds_and_sums(
    session_keys, identities, ckks_pair
) -> None:
    """With a threshold of 3: a round keyed to two sites, a survivor set of two, and an
    aggregate of two contributors are each refused by name, whatever the server claims."""
    _, server = ckks_pair
    stamp = round_of(7, roster=4)
    clients = _policed(session_keys, identities, 4, threshold=3)
    peers = [c.masker.publish(stamp.job, 40 + i) for i, c in enumerate(clients)]  # type: ignore[union-attr]
    with pytest.raises(PayloadError, match="keys to 2 site") as caught:
        clients[0].masker.advertise(stamp.for_sender(0), [peers[0], peers[1], None, None], b"")  # type: ignore[union-attr]
    assert caught.value.reason == "policy"
    _attempt(clients, stamp, peers, b"")
    with pytest.raises(PayloadError, match="threshold of 3") as caught:
        clients[0].confirm(stamp.for_sender(0), (0, 1))
    assert caught.value.reason == "policy"
    payloads = _encrypt(clients[:2], _updates(clients[0])[:2], stamp)
    with pytest.raises(PayloadError, match=r"aggregate adds 2 site\(s\)") as caught:
        clients[2].decrypt(server.sum(payloads, stamp), stamp)
    assert caught.value.reason == "policy"


def test_survivor_sets_shown_differently_are_caught_by_name(session_keys, identities) -> None:
    """The server shows clients 0 and 1 the full set, clients 2 and 3 a set without client 0
    (threshold 3 of 4). Client 1 signs only the first; neither group gathers three valid
    confirmations of its set, so no one reveals anything, and each names the sites whose
    confirmation is of another set."""
    stamp = round_of(8, roster=4)
    clients = _policed(session_keys, identities, 4, threshold=3)
    _agree(clients, stamp, sites=(50, 51, 52, 53))
    full, without = (0, 1, 2, 3), (1, 2, 3)
    signed = {p: clients[p].confirm(stamp.for_sender(p), full) for p in (0, 1)}
    signed |= {p: clients[p].confirm(stamp.for_sender(p), without) for p in (2, 3)}
    with pytest.raises(PayloadError, match="two survivor sets"):
        clients[1].confirm(stamp.for_sender(1), without)
    with pytest.raises(PayloadError, match=r"only 2 of the 3.*site 52, site 53\] signed another"):
        clients[0].reveal(stamp.for_sender(0), full, signed)
    with pytest.raises(PayloadError, match=r"only 2 of the 3.*site 51\] signed another") as caught:
        clients[2].reveal(stamp.for_sender(2), without, signed)
    assert caught.value.reason == "inconsistent"


def test_a_site_that_sent_its_update_sits_out_a_retry_of_the_round(
    session_keys, identities
) -> None:
    """Once a client sent its masked update in one attempt of a round, it refuses the round's
    later attempts: the same update in two sums would give away their difference (its key
    may be rebuilt from shares without it). A retry after only the scale exchange was
    unmasked (a server restarted mid-round) is taken."""
    stamp = round_of(9, roster=3)
    clients = _clients(session_keys, identities)
    peers = [c.masker.publish(stamp.job, 60 + i) for i, c in enumerate(clients)]  # type: ignore[union-attr]
    _attempt(clients, stamp, peers, b"")
    _reveals(clients, stamp.scales(), (0, 1, 2))
    _attempt(clients, stamp, peers, b"retry")  # a retry: the scales alone were unmasked
    retry = replace(stamp, attempt=b"retry")
    clients[0].encrypt(_updates(clients[0])[0], retry.for_sender(0))  # its update leaves
    with pytest.raises(PayloadError, match="sits the round out") as caught:
        clients[0].masker.advertise(stamp.for_sender(0), peers, b"another attempt")  # type: ignore[union-attr]
    assert caught.value.reason == "sit-out"


def test_a_retry_unmasks_the_scales_only_over_the_same_sites(session_keys, identities) -> None:
    """The scale exchange carries each site's count and training metrics, and training is
    seeded: a retry that unmasked it over one site fewer would give that site's away. Every
    site that unmasked the round's scales refuses another attempt's over other sites (so no
    one rebuilds its key from shares either), and takes one over the same sites."""
    stamp = round_of(10, roster=3)
    clients = _clients(session_keys, identities)
    peers = [c.masker.publish(stamp.job, 70 + i) for i, c in enumerate(clients)]  # type: ignore[union-attr]
    _attempt(clients, stamp, peers, b"")
    _reveals(clients, stamp.scales(), (0, 1, 2))
    _attempt(clients, stamp, peers, b"retry")
    retry = replace(stamp, attempt=b"retry").scales()
    signed = {p: clients[p].confirm(retry.for_sender(p), (1, 2)) for p in (1, 2)}
    for p in (1, 2):
        with pytest.raises(PayloadError, match="only over the same sites") as caught:
            clients[p].reveal(retry.for_sender(p), (1, 2), signed)
        assert caught.value.reason == "sit-out"
    _attempt(clients, stamp, peers, b"third")  # the same sites in a third attempt: taken
    assert len(_reveals(clients, replace(stamp, attempt=b"third").scales(), (0, 1, 2))) == 3


def test_an_aggregate_that_mixes_attempts_is_refused(session_keys, ckks_pair) -> None:
    """Each try of a masked round has its own nonce, bound into every contribution's round
    tag and integrity tag: a server that sums contributions of two attempts (say, to pair an
    update with another attempt's scales) gets an aggregate no client decrypts, under either
    attempt; one attempt's own sum decrypts."""
    _, server = ckks_pair
    loaded = keys.load_for_client(session_keys)
    clients = [CkksClient(loaded) for _ in range(CLIENTS)]
    one, two = (replace(round_of(10, roster=CLIENTS), attempt=a) for a in (b"one", b"two"))
    updates = _updates(clients[0])
    first = _encrypt(clients, updates, one)
    mixed = server.sum([*first[:2], clients[2].encrypt(updates[2], two.for_sender(2))], one)
    for attempt in (one, two):
        with pytest.raises(PayloadError) as caught:
            clients[0].decrypt(mixed, attempt)
        assert caught.value.reason in ("replayed", "forged")
    assert clients[0].decrypt(server.sum(first, one), one).contributors == (0, 1, 2)


def test_a_phase_unmasked_without_a_site_that_masked_it_is_refused(
    session_keys, identities
) -> None:
    """A site that sent a masked payload in an attempt decrypts that phase's aggregate only
    if it confirmed the survivors and unmasked with them: a server that left it out (and
    rebuilt its key from shares) to hand it another sum gets a refusal, not a silent wrong
    model."""
    stamp = replace(round_of(11, roster=CLIENTS), attempt=b"two")
    clients = _clients(session_keys, identities)
    _agree(clients, stamp, sites=(70, 71, 72), nonce=b"two")
    scales = stamp.scales()
    clients[0].encrypt(_updates(clients[0])[0], scales.for_sender(0))
    with pytest.raises(PayloadError, match="unmasked without this site") as caught:
        clients[0].masker.check_late(scales, (0, 1, 2))  # type: ignore[union-attr]
    assert caught.value.reason == "late-update"
    clients[1].masker.check_late(scales, (0, 1, 2))  # type: ignore[union-attr]  # sent none


def test_the_server_checks_attempt_keys_at_the_door(session_keys, identities) -> None:
    """What a server checks before relaying a site's attempt keys: signed by that site's key
    for this attempt, and points an agreement can use (a low-order point would make every
    pair secret with it known); a site that fails is left out, not relayed."""
    stamp = round_of(12, roster=CLIENTS)
    clients = _clients(session_keys, identities)
    peers = [c.masker.publish(stamp.job, 80 + i) for i, c in enumerate(clients)]  # type: ignore[union-attr]
    advert = clients[0].masker.advertise(stamp.for_sender(0), peers, b"n").advert  # type: ignore[union-attr]
    own = identities.verifier(80)
    masking.check_advert(stamp.job, 12, b"n", advert, own)
    for bad, public in (
        (advert, identities.verifier(81)),  # another site's key
        (replace(advert, signature=bytes(64)), own),
        (advert, own),  # checked under another attempt
        (replace(advert, publics=bytes(96)), None),  # the identity point
    ):
        nonce = b"other" if bad is advert and public is own else b"n"
        with pytest.raises(PayloadError) as caught:
            masking.check_advert(stamp.job, 12, nonce, bad, public)
        assert caught.value.reason == "bad-key"
