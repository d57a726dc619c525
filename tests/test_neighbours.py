"""The neighbour graph of large rounds (``secagg.crypto.neighbours``).

Above the policy's ``graph_above`` each client masks only with its picks and those that picked
it; the sum must still decrypt bit for bit, dropouts and a survivor lost while unmasking must
still be recovered, and a client whose picks a lying server leaves out of the survivor set
must reveal nothing. Small rounds with a small ``graph_above`` stand in for large ones: the
rules are the same.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import round_of, update_for

from secagg import keys
from secagg.config import RunConfig
from secagg.crypto.ckks import CkksClient
from secagg.crypto.masking import Masker, MaskRoster, SimulatedIdentities
from secagg.crypto.neighbours import exposure, graph, picks
from secagg.crypto.policy import RoundPolicy
from secagg.errors import ConfigError, PayloadError
from secagg.job import run_job

SIZE = 12
#: picks 4 of 11, 3 of which must survive and sign
POLICY = RoundPolicy.for_round_size(SIZE, 0, graph_above=8)


def _round(session_keys, stamp):  # type: ignore[no-untyped-def]
    """``SIZE`` clients with a graph policy, keys agreed and shares handed out."""
    identities = SimulatedIdentities()
    loaded = keys.load_for_client(session_keys)
    clients = [
        CkksClient(loaded, Masker(identities.signer, identities.verifier, policy=POLICY))
        for _ in range(SIZE)
    ]
    peers = [c.masker.publish(stamp.job, 100 + i) for i, c in enumerate(clients)]  # type: ignore[union-attr]
    advertised = [
        c.masker.advertise(stamp.for_sender(p), peers, b"")  # type: ignore[union-attr]
        for p, c in enumerate(clients)
    ]
    roster = MaskRoster.of(stamp.job, b"", peers, advertised, POLICY)
    for position, client in enumerate(clients):
        client.masker.agree(  # type: ignore[union-attr]
            stamp.for_sender(position), roster.adverts, roster.sealed_to(position), b""
        )
    return clients, roster


def _encrypt(clients, updates, stamp):  # type: ignore[no-untyped-def]
    return [
        c.encrypt(u, stamp.for_sender(p))
        for p, (c, u) in enumerate(zip(clients, updates, strict=True))
    ]


def _reveals(clients, stamp, survivors, revealing=None):  # type: ignore[no-untyped-def]
    signed = {p: clients[p].confirm(stamp.for_sender(p), survivors) for p in survivors}
    return [
        clients[p].reveal(stamp.for_sender(p), survivors, signed) for p in (revealing or survivors)
    ]


def test_picks_are_the_keys_own_distinct_and_never_the_picker() -> None:
    a = picks(b"job", 3, b"k" * 32, 5, 300, 80)
    assert len(a) == 80 and 5 not in a and all(0 <= p < 300 for p in a)
    assert picks(b"job", 3, b"k" * 32, 5, 300, 80) == a  # every reader computes the same
    assert picks(b"job", 3, b"K" * 32, 5, 300, 80) != a  # another key, other picks
    # Neighbours are symmetric: p masks with q exactly when q masks with p.
    keys_ = [(i, bytes([i]) * 32) for i in range(40)]
    around = [graph(b"job", keys_, p, 5)[1] for p in range(40)]
    assert all((q in around[p]) == (p in around[q]) for p in range(40) for q in range(40))
    assert max(len(a) for a in around) < 39  # not the full graph
    # The default's stated exposure: a third of the sites colluding, 2^-44.9 per site.
    assert 2**-46 < exposure(80, 60, 1 / 3) < 2**-44


def test_a_graph_round_sums_exactly_and_recovers_dropouts(session_keys, ckks_pair) -> None:
    _, server = ckks_pair
    stamp = round_of(1, roster=SIZE)
    clients, roster = _round(session_keys, stamp)
    assert len(roster.pairs_of(0)) < SIZE - 1  # not the full graph
    rng = np.random.default_rng(3)
    updates = [update_for(clients[0], rng.integers(-500, 500, 3000), 1 / SIZE) for _ in range(SIZE)]
    payloads = _encrypt(clients, updates, stamp)
    # Everyone survives, and one survivor (5) vanishes before it reveals: its key is rebuilt
    # from the shares its picks hold.
    everyone = tuple(range(SIZE))
    summed = server.sum(payloads, stamp)
    revealing = [p for p in everyone if p != 5]
    reveals = _reveals(clients, stamp, everyone, revealing)
    total = clients[1].decrypt(server.corrected(summed, reveals, stamp, roster), stamp)
    assert np.array_equal(total.values, sum(u.values for u in updates))
    # Client 7 dropped before uploading, and one of its neighbours vanishes before it
    # reveals: 7's mask key and the neighbour's self-mask key are both rebuilt from shares.
    stamp2 = round_of(2, roster=SIZE)
    clients, roster = _round(session_keys, stamp2)
    payloads = _encrypt(clients, updates, stamp2)
    survivors = tuple(p for p in everyone if p != 7)
    lost = min(roster.pairs_of(7))
    summed = server.sum([payloads[p] for p in survivors], stamp2)
    reveals = _reveals(clients, stamp2, survivors, [p for p in survivors if p != lost])
    total = clients[1].decrypt(server.corrected(summed, reveals, stamp2, roster), stamp2)
    assert total.contributors == survivors
    assert np.array_equal(total.values, sum(updates[p].values for p in survivors))


def test_a_site_whose_picks_are_called_dropped_reveals_nothing(session_keys) -> None:
    """A lying server calls two of client 0's four picks dropped (the set still meets the
    round's threshold, 10 of 12): client 0 refuses to reveal anything, by name."""
    stamp = round_of(3, roster=SIZE)
    clients, _ = _round(session_keys, stamp)
    called_dropped = sorted(clients[0].masker._current.picks)[:2]  # type: ignore[union-attr]
    survivors = tuple(p for p in range(SIZE) if p not in called_dropped)
    assert len(survivors) >= POLICY.threshold
    signed = {p: clients[p].confirm(stamp.for_sender(p), survivors) for p in survivors}
    with pytest.raises(PayloadError, match=r"only 2 of the sites .* reveals nothing") as caught:
        clients[0].reveal(stamp.for_sender(0), survivors, signed)
    assert caught.value.reason == "neighbours"


def test_a_graph_job_matches_the_unmasked_job(tmp_path, session_keys) -> None:
    """The digits job in one process, 12 clients a round over a neighbour graph (graph_above
    8): every round's metrics exactly those of the job without masks."""
    base = RunConfig(
        clients=SIZE,
        rounds=2,
        he=True,
        graph_above=8,
        tracking=False,
        device="cpu",
        keys_dir=str(session_keys),
    )
    masked = run_job(replace(base, output_dir=str(tmp_path / "m"))).rounds
    plain = run_job(replace(base, masking=False, output_dir=str(tmp_path / "u"))).rounds
    for m, u in zip(masked, plain, strict=True):
        assert (m.metrics, m.loss) == (u.metrics, u.loss), f"round {m.round}"
    with pytest.raises(ConfigError, match="graph_above"):
        replace(base, graph_above=2).validate()
