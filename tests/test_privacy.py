"""Distributed differential privacy (``secagg.privacy``, ``secagg.noise``).

The sampler must draw the discrete Gaussian (a goodness-of-fit test at ALPHA), the decrypted
sum must carry the calibrated noise and nothing else, a change above the clipping bound must be
clipped, epsilon must be the accountant's, and a budget must stop the run.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from conftest import round_of
from scipy import stats

from secagg import keys, noise, privacy, rotation
from secagg.builtin import task_for
from secagg.config import RunConfig
from secagg.crypto import Update
from secagg.crypto.ckks import CkksClient
from secagg.crypto.ckks_server import CkksServer
from secagg.crypto.quantized import QuantizedCipher
from secagg.errors import ConfigError, PayloadError
from secagg.flatten import Layout, flatten, payload_layout
from secagg.job import run_job

#: Significance of the statistical tests: an honest sampler fails one once in 1,000 runs.
ALPHA = 1e-3


@pytest.mark.parametrize("variance", [1, 50])
def test_the_sampler_draws_the_discrete_gaussian(variance: int) -> None:
    draws = noise.discrete_gaussian(variance, 200_000)
    edge = int(6 * math.sqrt(variance))
    support = np.arange(-edge, edge + 1)
    weights = np.exp(-(support.astype(float) ** 2) / (2 * variance))
    # The exact pmf, normalized over the integers (the tails beyond 40 sigma are nothing).
    wide = np.arange(-40 * edge, 40 * edge + 1).astype(float)
    pmf = weights / np.exp(-(wide**2) / (2 * variance)).sum()
    inside = np.clip(draws, -edge - 1, edge + 1)
    counts = np.array([(inside == x).sum() for x in support])
    tails = len(draws) - counts.sum()
    observed = np.append(counts, tails)
    expected = np.append(pmf, max(0.0, 1 - pmf.sum())) * len(draws)
    expected[-1] = max(expected[-1], 1e-9)
    keep = expected > 5  # chi-square needs expected counts of 5 or more
    merged = np.append(observed[keep], observed[~keep].sum())
    wanted = np.append(expected[keep], expected[~keep].sum())
    wanted *= merged.sum() / wanted.sum()
    assert stats.chisquare(merged, wanted).pvalue > ALPHA
    # Two calls draw afresh from the operating system's CSPRNG: never the same words.
    assert not np.array_equal(noise.discrete_gaussian(variance, 64), draws[:64])


def test_the_sampler_refuses_a_variance_it_cannot_draw_exactly() -> None:
    with pytest.raises(TypeError):
        noise.discrete_gaussian(2.5, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variance"):
        noise.discrete_gaussian(privacy.MAX_SIGMA**2 + 1, 10)


def test_a_change_above_the_bound_is_clipped_and_one_below_is_not() -> None:
    rule = privacy.Privacy(noise=1.0, clip=2.0, threshold=3)
    big, small = np.full(100, 1.0), np.full(100, 0.1)
    assert rule.clip_change(big) == pytest.approx(10.0)
    assert np.linalg.norm(big) == pytest.approx(2.0)
    assert rule.clip_change(small) == pytest.approx(1.0)
    assert np.array_equal(small, np.full(100, 0.1))


def _digits_update_layout(adaptive: bool = False) -> Layout:
    """The digits model's layout as a DP update with HE carries it (``extra_sizes``)."""
    _, layout = flatten(task_for(RunConfig()).build_model().state_dict())
    config = RunConfig(he=True, dp_noise=1.0, dp_clip_quantile=0.5 if adaptive else 0.0)
    return payload_layout(layout, config)


def _dp_round(session_keys, rule, stamp, changes, layout=None, clients=None, summed_by=None):  # type: ignore[no-untyped-def]
    """One codec round of ``len(changes)`` clients with DP, each drawing its noise ahead as
    it would while training: (decrypted sum, agreement); ``layout``: the updates' (the
    digits model's, padded as for DP, by default); ``clients``: the ciphers, kept from an
    earlier round; ``summed_by``: the positions whose updates the server adds (all)."""
    layout = layout or _digits_update_layout()
    changes = [np.concatenate([x, np.zeros(layout.size - x.size)]) for x in changes]
    loaded = keys.load_for_client(session_keys)
    clients = clients or [QuantizedCipher(CkksClient(loaded), layout, rule) for _ in changes]
    server = CkksServer(keys.load_for_server(session_keys))
    pairs = list(enumerate(zip(clients, changes, strict=True)))
    for i, (c, _) in pairs:
        c.precompute(stamp.for_sender(i))
    scales = server.sum(
        [c.prepare(x, stamp.for_sender(i), 1) for i, (c, x) in pairs], stamp.scales()
    )
    weight = 1 / len(changes)
    payloads = [
        c.encrypt(Update(x * weight, weight), stamp.for_sender(i), scales) for i, (c, x) in pairs
    ]
    chosen = [payloads[i] for i in (range(len(payloads)) if summed_by is None else summed_by)]
    summed = clients[0].decrypt(server.sum(chosen, stamp), stamp, scales)
    return summed, clients[0].agreement(stamp, scales)


def test_the_decrypted_sum_carries_the_calibrated_noise(session_keys) -> None:
    """Three clients, three rounds: the sum minus the clients' quantized updates is integer
    noise of mean 0 and variance 3 x the per-client variance the docs' formula gives (within
    five standard errors), drawn afresh every round (reused noise would cancel when two
    rounds are differenced)."""
    rule = privacy.Privacy(noise=1.0, clip=1.0, threshold=3)
    rng = np.random.default_rng(5)
    found, clients = [], None
    for round_num in (1, 2, 3):
        changes = [rng.normal(size=9610) for _ in range(3)]
        for change in changes:
            rule.clip_change(change)
        if clients is None:
            loaded = keys.load_for_client(session_keys)
            layout = _digits_update_layout()
            clients = [QuantizedCipher(CkksClient(loaded), layout, rule) for _ in changes]
        stamp = round_of(round_num, roster=3)
        summed, agreed = _dp_round(session_keys, rule, stamp, changes, clients=clients)
        step = float(agreed.steps[0])
        assert np.all(agreed.steps == step)
        # ceil((z ||x||)^2 / t), ||x||^2 = A^2 + d/4 + A + sqrt(d)/2, A = weight x C / step
        a, d = (1 / 3) * 1.0 / step, 10240
        wanted = math.ceil((a * a + d / 4 + a + math.sqrt(d) / 2) / 3)
        assert agreed.variance == max(privacy.MIN_VARIANCE, wanted)
        # Against the unrounded sum: rounding at random is unbiased, and adds at most 3/4 to
        # the variance (three clients' fractions), well inside the tolerance.
        exact = sum(x * (1 / 3) / step for x in changes)
        found.append(summed.values[: exact.size] / step - exact)
    drawn = np.concatenate(found)
    expected = 3 * agreed.variance
    error = expected * math.sqrt(2 / drawn.size)
    assert abs(drawn.var() - expected) < 5 * error, (drawn.var(), expected)
    assert abs(drawn.mean()) < 5 * math.sqrt(expected / drawn.size)
    assert (found[0] - found[1]).var() > expected  # fresh noise: 2 x expected; reused: ~0


def test_a_rotated_value_past_the_bound_is_clipped_and_counted_and_small_sums_refused(
    session_keys,
) -> None:
    """Changes aligned with one Hadamard row put their whole norm on one rotated value, five
    times the steps' bound: each is clipped to it and counted, and the sum holds the clipped
    values (neither the unclipped ones nor a wrap). A sum of fewer updates than the threshold
    carries less noise than DP counts on: no client decrypts it."""
    rule = privacy.Privacy(noise=0.1, clip=1.0, threshold=3)
    stamp = round_of(4, roster=3)
    signs = rotation.rotation_signs(stamp.job + (4).to_bytes(8, "big"), 10240)
    aligned = np.zeros(9610)
    aligned[: privacy.ROTATION] = signs[: privacy.ROTATION] / 32  # norm 1, the clip
    summed, agreed = _dp_round(session_keys, rule, stamp, [aligned] * 3)
    assert summed.clipped == 3
    deviation = math.sqrt(3 * agreed.variance) * float(agreed.steps[0])
    top = rotation.rotate(summed.values, signs)[0]  # unclipped: 1; each clipped to 6.5/32/3
    assert abs(top - 6.5 / 32) < 5 * deviation < 0.5, (top, deviation)
    with pytest.raises(PayloadError, match="fewer than the 3") as caught:
        _dp_round(session_keys, rule, round_of(5, roster=3), [aligned] * 3, summed_by=[0, 1])
    assert caught.value.reason == "below-threshold"


def test_the_rotation_signs_are_random_and_the_rounds_own() -> None:
    one, two = (rotation.rotation_signs(label, 10240) for label in (b"round 1", b"round 2"))
    assert set(np.unique(one)) == {-1.0, 1.0} and abs(one.mean()) < 0.05  # 5 sigma: 0.049
    assert abs((one * two).mean()) < 0.05  # independent from round to round
    assert np.array_equal(one, rotation.rotation_signs(b"round 1", 10240))  # every client's


def test_adaptive_clipping_counts_the_sites_under_the_clip_inside_the_noised_sum(
    session_keys,
) -> None:
    """Adaptive clipping (Andrew et al. 2021): each site appends +-bC, so the decrypted,
    noised sum tells every site the fraction under the clip (9 of 12 here) and nothing
    about which; the count's noise is m/20 sites, and the update pays for the signal in its
    sensitivity (so the accountant's epsilon holds for both)."""
    rule = privacy.Privacy(noise=0.1, clip=1.0, threshold=12, quantile=0.5, per_round=12)
    counted = rule.noise * math.sqrt(1 + rule.signal**2) / (2 * rule.signal)
    assert counted == pytest.approx(12 / 20)
    assert rule.sensitivity == pytest.approx(math.sqrt(1 + rule.signal**2))
    rng = np.random.default_rng(11)
    norms = [0.5] * 9 + [3.0] * 3
    layout = _digits_update_layout(adaptive=True)
    changes = []
    for norm in norms:
        change = rng.normal(size=9610)
        change *= norm / np.linalg.norm(change)
        before = rule.clip_change(change)
        changes.append(rule.as_update(change, before, layout.size))
    summed, _ = _dp_round(session_keys, rule, round_of(2, roster=12), changes, layout)
    assert summed.values.size == layout.size == 10240
    below = rule.below(summed.values[9610] / summed.weight)
    assert abs(below - 0.75) < 5 * 0.05, below  # five standard deviations of m/20 of 12
    # The clip steps towards the quantile: down when more than it are under, up when fewer.
    assert rule.after(below).clip == pytest.approx(math.exp(-0.2 * (below - 0.5)))
    assert rule.after(0.0).clip > 1.0 > rule.after(1.0).clip
    assert rule.below(-1e9) == 0.0 and rule.below(1e9) == 1.0


def test_the_rotation_keeps_the_summed_noise_near_central_dps(session_keys) -> None:
    """50 sites, noise multiplier 4.72 (epsilon 3 over 10 rounds): the decrypted sum carries
    at least the noise any 34 sites (the threshold) owe, and, with the randomized Hadamard
    rotation letting the codec's steps follow the flattened values rather than the clip,
    at most 1.33 times central DP's (1.40 with steps set from the clip, as before it)."""
    sites, threshold = 50, 34
    rule = privacy.Privacy(noise=4.72, clip=1.0, threshold=threshold)
    layout = _digits_update_layout()
    rng = np.random.default_rng(8)
    changes = []
    for _ in range(sites):
        change = rng.normal(size=9610)
        rule.clip_change(change)
        changes.append(change)
    summed, agreed = _dp_round(session_keys, rule, round_of(3, roster=sites), changes, layout)
    assert np.all(agreed.steps == agreed.steps[0])
    exact = sum(x / sites for x in changes)
    drawn = summed.values[: exact.size] - exact
    central = rule.noise * rule.clip / sites  # per value, on the sum of weighted updates
    ratio = float(drawn.std()) / central
    assert math.sqrt(sites / threshold) * 0.97 < ratio < 1.33, ratio
    assert abs(float(drawn.mean())) < 5 * drawn.std() / math.sqrt(drawn.size)
    assert summed.clipped == 0  # no rotated value went past the steps' bound


def test_the_rotation_is_orthogonal_and_its_own_inverse() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=3 * privacy.ROTATION)
    signs = rotation.rotation_signs(b"round", values.size)
    turned = rotation.rotate(values, signs)
    assert np.linalg.norm(turned) == pytest.approx(np.linalg.norm(values))
    assert np.allclose(rotation.unrotate(turned, signs), values, atol=1e-12)
    spike = np.zeros(privacy.ROTATION)
    spike[7] = 1.0  # one large value is spread evenly
    assert np.allclose(np.abs(rotation.rotate(spike, signs[: spike.size])), 1 / 32)
    with pytest.raises(ValueError, match="whole number of 1024-value chunks"):
        rotation.rotate(np.ones(1000), np.ones(1000))


def test_the_clip_signal_never_costs_the_update_over_ten_percent_more_noise() -> None:
    """Few sites a round (or much noise): the count gets noisier instead."""
    few = privacy.Privacy(noise=2.0, clip=0.5, threshold=6, quantile=0.5, per_round=8)
    assert few.sensitivity == pytest.approx(0.5 * privacy.MAX_SIGNAL_COST)
    many = replace(few, per_round=100)
    assert many.sensitivity < 0.5 * 1.03  # 2 % more noise buys a count within 100/20
    assert privacy.Privacy(noise=2.0, clip=0.5, threshold=6).sensitivity == 0.5  # fixed


@pytest.mark.parametrize("he", [True, False])
def test_the_clip_follows_its_quantile_from_round_to_round(tmp_path, session_keys, he) -> None:
    """The digits job with a clip far above every update: each round every site is under
    it, so the clip shrinks by about exp(-rate x (1 - 0.5)), the same on every site (HE:
    distributed noise; plaintext: the server's central noise); epsilon is the
    accountant's for the noise multiplier alone."""
    config = RunConfig(
        clients=10,
        rounds=3,
        he=he,
        dp_noise=0.05,
        dp_clip=5.0,
        dp_clip_quantile=0.5,
        keys_dir=str(session_keys),
        tracking=False,
        device="cpu",
        output_dir=str(tmp_path / "run"),
    )
    result = run_job(config)
    clips = [r.metrics["train_dp_clip"] for r in result.rounds]
    assert clips[0] == pytest.approx(5.0, rel=1e-6)
    for before, after in itertools.pairwise(clips):
        # under the clip: 1 (the count's noise, m/20 = 0.5 of 10 sites, only lowers it)
        assert math.exp(-0.1) * (1 - 1e-6) <= after / before <= math.exp(-0.04)
    for row in result.rounds:
        wanted = _accountant_epsilon(0.05, row.round, 1.0, 1e-5)
        assert row.epsilon == pytest.approx(wanted, rel=1e-9)


def test_plaintext_dp_is_central_noise_of_the_same_multiplier() -> None:
    """Without HE the server noises the sum it reads: standard deviation noise x clip / N
    for N clients weighing 1/N each, on the values only (the ledger stays exact)."""
    from secagg.crypto.plain import PlainCipher

    rule = privacy.Privacy(noise=2.0, clip=1.5, threshold=3)
    cipher = PlainCipher("float64", rule)
    stamp = round_of(4, roster=3)
    payloads = [
        cipher.encrypt(Update(np.zeros(50_000), 1 / 3), stamp.for_sender(i)) for i in range(3)
    ]
    summed = cipher.decrypt(cipher.sum(payloads, stamp), stamp)
    expected = 2.0 * 1.5 / 3
    assert abs(summed.values.std() / expected - 1) < 5 * math.sqrt(1 / 2 / 50_000)
    assert summed.weight == pytest.approx(1.0) and summed.contributors == (0, 1, 2)


def test_rounding_at_random_is_unbiased_and_stays_within_its_norm() -> None:
    rng = np.random.default_rng(2)
    scaled = rng.normal(scale=3.0, size=20_000)
    bound = math.sqrt(float(scaled @ scaled) + scaled.size / 4 + 10)
    draws = np.stack([noise.round_within(scaled, bound) for _ in range(40)])
    assert np.all(np.abs(draws - scaled) < 1) and np.all(draws == np.rint(draws))
    assert np.all(np.einsum("ij,ij->i", draws, draws) <= bound**2)
    error = (draws - scaled).mean(axis=0)  # unbiased: the mean error shrinks as 1/sqrt(n)
    assert abs(error.mean()) < 5 * 0.5 / math.sqrt(draws.size)
    with pytest.raises(ValueError, match="no rounding within the norm"):
        noise.round_within(scaled, math.sqrt(float(scaled @ scaled)) - 50, tries=3)


def test_a_count_other_than_one_is_refused_under_dp(session_keys) -> None:
    """With DP every site weighs 1: a count claimed inside the encryption is a lie."""
    rule = privacy.Privacy(noise=1.0, clip=1.0, threshold=2)
    loaded = keys.load_for_client(session_keys)
    _, model = flatten(task_for(RunConfig()).build_model().state_dict())
    with pytest.raises(ConfigError, match="whole number of 1024-value rotation chunks"):
        QuantizedCipher(CkksClient(loaded), model, rule)
    layout = _digits_update_layout()
    clients = [QuantizedCipher(CkksClient(loaded), layout, rule) for _ in range(2)]
    server = CkksServer(keys.load_for_server(session_keys))
    stamp = round_of(9, roster=2)
    change = np.zeros(layout.size)
    scales = server.sum(
        [
            clients[0].prepare(change, stamp.for_sender(0), 1),
            clients[1].prepare(change, stamp.for_sender(1), 500),  # a count, under DP
        ],
        stamp.scales(),
    )
    with pytest.raises(PayloadError, match="every site weighs 1") as caught:
        clients[0].agreement(stamp, scales)
    assert caught.value.reason == "bad-total"


def _accountant_epsilon(noise_multiplier, rounds, sampling, delta):  # type: ignore[no-untyped-def]
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        sampling, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


def test_a_dp_job_reports_the_accountants_epsilon_and_stops_at_its_budget(
    tmp_path, session_keys
) -> None:
    """The digits job with DP, 6 clients of 12 a round: each round's epsilon in
    results.json is the accountant's for the same mechanism; a budget two rounds allow
    ends the run after round 2 of 3, with a warning that says so."""
    config = RunConfig(
        clients=12,
        clients_per_round=6,
        rounds=3,
        he=True,
        dp_noise=1.0,
        dp_clip=0.5,
        keys_dir=str(session_keys),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        device="cpu",
    )
    budget = (_accountant_epsilon(1.0, 2, 0.5, 1e-5) + _accountant_epsilon(1.0, 3, 0.5, 1e-5)) / 2
    with pytest.warns(UserWarning, match="allows 2 of the job's 3 rounds"):
        result = run_job(replace(config, dp_epsilon=budget, output_dir=str(tmp_path / "r")))
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    for row in saved["rounds"]:
        wanted = _accountant_epsilon(1.0, row["round"], 0.5, 1e-5)
        assert row["epsilon"] == pytest.approx(wanted, rel=1e-9)
    assert result.rounds[-1].epsilon <= budget
    # MLflow holds the same series, and the run says what DP it ran with.
    from mlflow.tracking import MlflowClient

    store = MlflowClient(str(result.tracking_uri))
    history = store.get_metric_history(str(result.mlflow_run_id), "epsilon")
    assert [(m.step, m.value) for m in history] == [
        (r["round"], pytest.approx(r["epsilon"])) for r in saved["rounds"]
    ]
    run = store.get_run(str(result.mlflow_run_id))
    assert "differential privacy: epsilon" in run.data.tags["mlflow.note.content"]
    # A budget alone calibrates the noise to it for the job's rounds.
    calibrated = replace(config, dp_noise=0.0, dp_epsilon=4.0)
    z = calibrated.noise_multiplier()
    assert _accountant_epsilon(z, 3, 0.5, 1e-5) <= 4.0 < _accountant_epsilon(z * 0.99, 3, 0.5, 1e-5)


def test_dp_needs_sane_settings() -> None:
    with pytest.raises(ConfigError, match="dp_clip"):
        RunConfig(he=True, dp_noise=1.0, dp_clip=0.0).validate()
    with pytest.raises(ConfigError, match="dp_delta"):
        RunConfig(he=True, dp_noise=1.0, dp_delta=1.0).validate()
    with pytest.raises(ConfigError, match="dp_delta must be below 1 / clients"):
        RunConfig(he=True, clients=8, dp_noise=1.0, dp_delta=0.2).validate()
    for name, value in (
        ("dp_noise", math.inf),
        ("dp_noise", 1e-300),
        ("dp_noise", math.nan),
        ("dp_clip", math.inf),
        ("dp_epsilon", math.inf),
    ):
        with pytest.raises(ConfigError, match=name):
            replace(RunConfig(he=True, dp_noise=1.0), **{name: value}).validate()
    with pytest.raises(ConfigError, match="needs the pairwise masks"):
        RunConfig(he=True, masking=False, dp_epsilon=3.0).validate()
    assert not RunConfig(he=True).dp  # off unless asked for
    with pytest.raises(ConfigError, match="dp_clip_quantile must be in"):
        RunConfig(he=True, dp_noise=1.0, dp_clip_quantile=1.0).validate()
    with pytest.raises(ConfigError, match="set dp_epsilon or dp_noise too"):
        RunConfig(he=True, dp_clip_quantile=0.5).validate()


def test_kits_that_require_dp_refuse_a_job_with_less() -> None:
    """A project can sign a DP floor into its kits: a job the server sends with less noise,
    a larger clip, no DP or no HE is refused by every site, by name."""
    from secagg.crypto.policy import RoundPolicy

    policy = replace(RoundPolicy.for_round_size(4), dp_noise=1.0, dp_clip=0.5)
    assert RoundPolicy.from_bytes(policy.to_bytes()) == policy  # what the CA signs
    base = RunConfig(he=True, clients=4, dp_noise=1.0, dp_clip=0.5)
    policy.check_job(base)
    policy.check_job(replace(base, dp_noise=2.0, dp_clip=0.1))  # more noise, tighter clip
    for weaker, said in (
        (replace(base, dp_noise=0.5), "noise multiplier 0.500"),
        (replace(base, dp_clip=1.0), "with clip 1"),
        (replace(base, dp_noise=0.0), "adds no DP"),
        (replace(base, he=False), "plaintext FedAvg"),
    ):
        with pytest.raises(PayloadError, match=said) as caught:
            policy.check_job(weaker)
        assert caught.value.reason == "policy"
    with pytest.raises(ConfigError, match="both positive"):
        replace(policy, dp_clip=0.0)
    # DP's noise split needs the masks, even where the kits require only HE.
    with pytest.raises(PayloadError, match="and no masks"):
        replace(policy, protection="he").check_job(replace(base, masking=False))
    for noise_, clip in ((math.nan, 0.5), (1.0, math.nan), (math.inf, 0.5), (1.0, math.inf)):
        with pytest.raises(ConfigError, match="positive and finite"):
            replace(policy, dp_noise=noise_, dp_clip=clip)


def test_a_resumed_dp_run_keeps_its_noise_and_stays_within_its_budget(tmp_path) -> None:
    """A run whose noise its budget calibrated, resumed with more rounds, adds the same noise
    (another multiplier would make the reported epsilon wrong) and stops where the budget is
    spent."""
    from secagg.resume import plan_resume

    run = tmp_path / "run"
    config = RunConfig(clients=3, rounds=1, dp_epsilon=1.0, tracking=False, output_dir=str(run))
    run_job(config)
    assert plan_resume(run, {"rounds": 4}).config.dp_noise == config.noise_multiplier()
    with pytest.warns(UserWarning, match="allows 1 of the job's 4 rounds"):
        resumed = run_job(config, resume_dir=run, resume_changes={"rounds": 4})
    spent = [r["epsilon"] for r in json.loads((run / "results.json").read_text())["rounds"]]
    assert len(spent) == 1 and spent[0] <= 1.0 and resumed.config.rounds == 4
