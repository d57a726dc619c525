"""A site's sample count and training metrics travel inside the encrypted scale exchange
(``secagg.crypto.report``): the server never reads one site's, and every client reads the
count-weighted averages a plaintext server would have computed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg import rounds
from secagg.crypto import report
from secagg.crypto.packing import PACKINGS
from secagg.errors import PayloadError
from secagg.messages import EvalReply, TrainReply
from secagg.server import Server
from secagg.transport.inprocess import InProcessTransport


def _summed(reports: list[tuple[dict[str, float], int]]) -> np.ndarray:
    return np.sum([report.encode(metrics, count) for metrics, count in reports], axis=0)


def test_the_summed_reports_give_each_metrics_count_weighted_average() -> None:
    rng = np.random.default_rng(5)
    counts = [int(c) for c in rng.integers(1, 10**7, 6)]
    sites = [({"loss": float(rng.normal(3, 2)), "f1": float(rng.random())}, c) for c in counts]
    averages = report.read(_summed(sites), sites[0][0], len(sites)).averages
    assert averages is not None
    for name in ("loss", "f1"):
        expected = sum(m[name] * c for m, c in sites) / sum(counts)
        assert math.isclose(averages[name], expected, rel_tol=1e-9, abs_tol=1e-9), name


def test_a_site_with_a_non_finite_value_makes_that_metric_nan_only() -> None:
    sites = [({"loss": math.nan, "acc": 0.5}, 10), ({"loss": 1.0, "acc": 0.7}, 30)]
    averages = report.read(_summed(sites), {"loss": 0, "acc": 0}, 2).averages
    assert averages is not None and math.isnan(averages["loss"])
    assert math.isclose(averages["acc"], (0.5 * 10 + 0.7 * 30) / 40, rel_tol=1e-12)


def test_sites_that_report_other_metrics_are_averaged_as_plaintext_averages_them() -> None:
    """A site whose test set has one class reports no AUC: each metric is averaged over the
    sites that reported it, exactly as plaintext FedAvg averages it in the open, and every
    site reads the metrics it reported itself (the round keeps each name's majority)."""
    sites = [
        ({"loss": 0.5, "auc": 0.9, "acc": 0.8}, 10),
        ({"loss": 0.7, "acc": 0.6}, 30),
        ({"loss": 0.2, "auc": 0.7, "acc": 0.9, "f1": 0.4}, 20),
    ]
    summed = _summed(sites)
    views = [report.read(summed, metrics, len(sites)).averages for metrics, _ in sites]
    assert all(view is not None for view in views)
    assert set(views[1] or {}) == {"loss", "acc"}  # a site reads only the names it knows
    expected = rounds._averaged([(count, metrics) for metrics, count in sites])
    agreed = rounds._agreed([view for view in views if view is not None])
    assert agreed.keys() == expected.keys() == {"loss", "auc", "acc", "f1"}
    for name, value in expected.items():
        assert math.isclose(agreed[name], value, rel_tol=1e-9, abs_tol=1e-9), name


def test_names_that_meet_in_one_entry_read_nan_never_a_mix() -> None:
    """Two sites whose names land in the same entry (a collision another site resolved
    differently): the entry's fingerprint sum shows the mix, and it reads NaN."""
    names = [f"m{i}" for i in range(2000)]
    first = names[0]
    other = next(
        n for n in names[1:] if report.fingerprint(n) % 65 == report.fingerprint(first) % 65
    )
    summed = _summed([({first: 1.0}, 5), ({other: 3.0}, 5)])
    assert math.isnan((report.read(summed, {first: 0}, 2).averages or {})[first])
    assert report.read(_summed([({first: 1.0}, 5)]), {first: 0}, 1).averages == {first: 1.0}


def test_the_largest_sum_a_round_may_add_fits_every_packing() -> None:
    """1,024 sites (the widest round) each at the bound: no summed value leaves the
    narrowest packing's digit, so the sum stays exact."""
    extreme = report.encode({"a": -(2.0**31) + 1, "b": 2.0**31 - 1}, 2**53 - 1)
    assert (extreme * 1024).max() <= min(p.sum_limit for p in PACKINGS)
    with pytest.raises(PayloadError, match="out of range"):
        report.read(extreme * 1024 + 16 * 1024, {"a": 0, "b": 0}, 1024)


class _Recording(InProcessTransport):
    def train(self, round_stamp):  # type: ignore[no-untyped-def]
        self.replies: list[TrainReply] = super().train(round_stamp)
        return self.replies

    def evaluate(self, stamp):  # type: ignore[no-untyped-def]
        self.evals: list[EvalReply] = super().evaluate(stamp)
        return self.evals


def _round(session_keys, he: bool, lie: int = 1, lie_eval: int = 1, masking: bool = True):  # type: ignore[no-untyped-def]
    from secagg.builtin import task_for
    from secagg.config import RunConfig
    from secagg.crypto import for_server
    from secagg.job import build_clients

    config = RunConfig(
        clients=3, he=he, masking=masking, keys_dir=str(session_keys), tracking=False, device="cpu"
    )
    transport = _Recording(build_clients(config, task_for(config)))
    if lie > 1:  # site 0 encrypts a count far beyond max_client_samples
        cipher = transport.slots[0].cipher
        prepare = cipher.prepare
        cipher.prepare = lambda v, s, n=1, m=None: prepare(v, s, n * lie, m)  # type: ignore[method-assign,assignment]
    if lie_eval > 1:  # site 0 encrypts a test count far beyond max_client_samples
        cipher = transport.slots[0].cipher
        evaluation = cipher.evaluation
        cipher.evaluation = lambda s, m, n=0, u=False: evaluation(s, m, n * lie_eval, u)  # type: ignore[method-assign,assignment]
    server = Server(for_server(he, session_keys), masking=he and masking)
    metrics, _ = rounds.run_round(server, transport, rounds.round_stamp(bytes(16), 1, 3))
    return metrics, transport


def test_the_server_reads_no_sites_count_or_metrics_under_he(session_keys) -> None:
    """Under HE the server gets no site's training count or metrics, and no site's
    evaluation: only ciphertexts, whose sum the sites decrypt. The round's metrics are the
    ones plaintext FedAvg averages in the open."""
    he, secret = _round(session_keys, he=True)
    plain, seen = _round(session_keys, he=False)
    assert all(r.num_samples == 0 and r.metrics == {} for r in secret.replies)
    assert all(r.num_samples > 0 and "loss" in r.metrics for r in seen.replies)
    # Every site of the round sends an evaluation (zeros without test data), none in plain.
    assert len(secret.evals) == 3
    assert all(e.payload and e.num_samples == 0 and not e.metrics for e in secret.evals)
    assert all(math.isnan(e.loss) for e in secret.evals)
    assert seen.evals and all(not e.payload and e.num_samples > 0 for e in seen.evals)
    assert math.isclose(he.train_loss, plain.train_loss, rel_tol=1e-9)
    assert he.value("accuracy") == plain.value(
        "accuracy"
    )  # one test set, at site 0: the same digits right
    assert math.isclose(he.loss, plain.loss, rel_tol=1e-4)  # the models differ by rounding


def test_a_count_lied_inside_the_encryption_is_refused_by_the_clients(session_keys) -> None:
    with pytest.raises(PayloadError, match="a site misreported its count") as caught:
        _round(session_keys, he=True, lie=10**9)
    assert caught.value.reason == "bad-total"


def test_a_test_count_lied_inside_the_encryption_leaves_the_metrics_unknown(
    session_keys,
) -> None:
    """The round's model stands (it is applied before anyone evaluates); its evaluation,
    which no site can trust, is reported as unknown, with a warning naming why."""
    with pytest.warns(UserWarning, match="a site misreported its count"):
        metrics, _ = _round(session_keys, he=True, lie_eval=10**9)
    assert math.isnan(metrics.value("accuracy")) and math.isnan(metrics.loss)


@pytest.mark.parametrize("masking", [True, False])
def test_one_sites_evaluation_is_masked_from_a_colluding_key_holder(
    session_keys, masking: bool
) -> None:
    """Site 0's encrypted evaluation, which the server could hand to a colluding site: with
    masks (the default) what that site decrypts has uniform low bits (chi-square at 1e-3);
    without, the same test rejects it (the report's limbs, in the clear)."""
    from scipy import stats

    from secagg import keys
    from secagg.crypto import rlwe
    from secagg.crypto.ckks import first_index
    from secagg.crypto.envelope import UPDATE
    from secagg.crypto.packing import packing_for
    from secagg.crypto.seal_format import from_wire

    metrics, transport = _round(session_keys, he=True, masking=masking)
    assert metrics.value("accuracy") > 0.1  # the masked sum was unmasked and read
    colluder = transport.slots[1].cipher.inner
    stamp = rounds.round_stamp(bytes(16), 1, 3).evaluation(3).for_sender(0)
    opened = colluder._format.open(transport.evals[0].payload, stamp, UPDATE)
    n, q = colluder._shape.poly_modulus_degree, colluder._shape.modulus
    c0 = from_wire(opened.body, q).reshape(opened.blob_count, n)
    secret = rlwe.SecretKey(keys.load_for_client(session_keys).context, colluder._shape)
    bits = packing_for(stamp.roster).scale_bits
    phase = secret.decrypt(c0, opened.seeds, first_index(stamp))
    seen = ((phase + (1 << (bits - 1))) >> bits).reshape(-1) % 256
    pvalue = stats.chisquare(np.bincount(seen, minlength=256)).pvalue
    assert pvalue > 1e-3 if masking else pvalue < 1e-100


def test_a_site_never_sends_its_evaluation_unmasked(session_keys) -> None:
    """A server that asks for the evaluation of a round (or a roster) the site holds no mask
    keys for would get it unmasked, for a colluding key holder to read: the site refuses."""
    _, transport = _round(session_keys, he=True)
    site = transport.slots[0]
    for stamp in (
        rounds.round_stamp(bytes(16), 7, 3).evaluation(3),  # a round it agreed no keys for
        rounds.round_stamp(bytes(16), 1, 3).evaluation(4),  # another roster than it keyed
    ):
        with pytest.raises(PayloadError, match="sends none unmasked"):
            site.evaluate(stamp.for_sender(0))


def test_sites_that_read_an_undefined_metric_agree_on_it() -> None:
    """Averages reported back over the network are fresh floats: two NaNs (an undefined
    metric) are still one answer, with no warning."""
    import warnings

    views = [{"auc": float("nan"), "acc": 0.5} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agreed = rounds._agreed(views)
    assert math.isnan(agreed["auc"]) and agreed["acc"] == 0.5
