"""Distributed differential privacy inside the encrypted sum.

Each client clips its change to the global model to an L2 norm of at most ``clip`` (``C``),
weighs it uniformly (``1 / N`` for the round's ``N`` clients: a sample-count weight has no
bound, so no sensitivity), quantizes it on the round's steps and adds discrete Gaussian noise
to its integers (``secagg.noise``) before it encrypts them. Only the sum is ever decrypted, and
it carries every client's noise: no party, the server or a key holder, sees a less noised value
(the distributed discrete Gaussian, Kairouz, Liu and Steinke, ICML 2021).

**How much noise.** With noise multiplier ``z``, the sum of any ``threshold`` (``t``, the round
policy's) clients' noise has standard deviation ``z`` times the L2 sensitivity of one client's
integers: each rounds its scaled change ``x`` (``||x|| <= a C``, ``a`` its weight over the
step) up or down at random, unbiased, and draws again until the norm is at most ``sqrt((aC)^2 +
d/4 + aC + sqrt(d)/2)`` for ``d`` values (conditional randomized rounding, as in the DDG paper:
the rounding adds to the norm in quadrature, not ``sqrt(d)/2`` outright). Each client draws
variance ``ceil(sigma_t^2 / t)``, so that a sum of ``t`` or more has at least the target,
however many dropped out: the round policy refuses smaller sums. Colluding clients that know
their own noise take it away, leaving the honest clients' share: with ``c`` colluders among
``n`` contributors, a ``(n - c) / t`` fraction of the target variance (``t - 1`` colluders of a
sum of ``t`` leave a ``1 / t`` fraction).

**The integers have room for it.** The steps are set from ``C``, never from the data (each
client reports ``C`` as its largest change in every block of the scale exchange, so the
exchange leaks nothing), and leave room for twelve standard deviations of the summed noise in
the codec's range: a sum wraps with chance below ``10^-32`` per value. The per-client standard
deviation stays at most ``MAX_SIGMA`` by coarser steps, which only moves the rounding
further below the noise.

**Accounting** (``epsilon``): Google's ``dp-accounting`` (RDP), the Gaussian mechanism with
noise multiplier ``z`` per round, Poisson-subsampled at ``clients_per_round / clients`` (an
approximation of secagg's fixed-size sampling, as in DP-FedAvg; exact with every client in
every round), composed over rounds; the neighbouring datasets differ by one client's whole
data (user-level DP). The sum of discrete Gaussians differs from a Gaussian by a term below
``10^-60`` at the variances used (each client's is at least 16), which the accountant leaves
out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from secagg.errors import ConfigError, PayloadError

#: The largest standard deviation of one client's noise (``secagg.noise`` keeps its exact
#: arithmetic within 64 bits up to it).
MAX_SIGMA = 4096

#: Standard deviations of the summed noise kept free in the codec's integer range.
HEADROOM_SIGMAS = 12
#: The least variance a client draws (the sum of discrete Gaussians is then a Gaussian to
#: within ``10^-60``; see the module docstring).
MIN_VARIANCE = 16


@dataclass(frozen=True)
class Privacy:
    """A job's distributed DP, as every client applies it."""

    #: noise multiplier: the summed noise of ``threshold`` clients over one client's sensitivity
    noise: float
    #: the L2 bound of one client's change, in the model's units
    clip: float
    #: the fewest contributors any sum has (the round policy's)
    threshold: int

    def clip_change(self, change: np.ndarray) -> float:
        """Scale ``change`` in place to an L2 norm of at most ``clip``; return its norm before."""
        norm = float(np.linalg.norm(change))
        if norm > self.clip:
            change *= self.clip / norm
        return norm

    def rounded_norm(self, weight: float, step: float, values: int) -> float:
        """The L2 norm no client's rounded integers exceed (its sensitivity) when it weighs
        its change ``weight`` and rounds ``values`` of them on ``step``: with ``A = weight x
        clip / step`` the largest norm before rounding, ``sqrt(A^2 + d/4 + A + sqrt(d)/2)``.
        Randomized rounding adds ``d/4`` in expectation, in quadrature, where rounding to the
        nearest could add ``sqrt(d)/2`` to the norm; a client draws its rounding again until
        it is within the bound (``noise.round_within``, the DDG paper's conditional rounding),
        so the bound holds always."""
        scaled = weight / step * self.clip
        d = float(values)
        return math.sqrt(scaled**2 + d / 4 + scaled + math.sqrt(d) / 2)

    def calibrate(self, weight: float, step: float, values: int, clients: int) -> int:
        """Each client's discrete Gaussian variance (integer units) for a round whose clients
        weigh their change ``weight`` and quantize it on ``step``: at least ``MIN_VARIANCE``."""
        target = (self.noise * self.rounded_norm(weight, step, values)) ** 2
        return max(MIN_VARIANCE, math.ceil(target / self.threshold))

    def level(self, limit: int, clients: int, variance_at: Callable[[int], int]) -> int:
        """The largest summed integer the data may reach (the steps are set for it) that
        leaves ``HEADROOM_SIGMAS`` of the ``clients``' summed noise within ``limit``;
        ``variance_at(level)`` is the variance each client draws at that level."""

        def fits(level: int) -> bool:
            variance = variance_at(level)
            spread = HEADROOM_SIGMAS * math.sqrt(clients * variance)
            return variance <= MAX_SIGMA**2 and level + spread <= limit

        low, high = clients + 1, limit
        if not fits(low):
            raise PayloadError(
                f"a noise multiplier of {self.noise} leaves the codec no room for the round's "
                f"{clients} updates: lower dp_noise, or raise dp_epsilon",
                "dp-range",
            )
        while low < high:  # the largest level that fits (fits is monotone in it)
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low


def central_noise(privacy: Privacy, clients: int, count: int) -> np.ndarray:
    """Central DP's noise for a plaintext sum of ``clients`` updates each weighed
    ``1 / clients``: standard deviation ``noise x clip / clients`` per value, the same noise
    multiplier as the distributed mechanism's. Drawn exactly as the sites' noise is (a
    discrete Gaussian of standard deviation ``MAX_SIGMA``, scaled: a grid 4,096 times finer
    than the deviation, from the OS's CSPRNG)."""
    from secagg.noise import discrete_gaussian

    deviation = privacy.noise * privacy.clip / clients
    return discrete_gaussian(MAX_SIGMA**2, count) * (deviation / MAX_SIGMA)


@lru_cache(maxsize=4096)
def epsilon(noise: float, rounds: int, sampling: float, delta: float) -> float:
    """The ``(epsilon, delta)`` guarantee of ``rounds`` rounds of the Gaussian mechanism with
    noise multiplier ``noise``, each over a ``sampling`` fraction of the clients (RDP)."""
    if rounds <= 0:
        return 0.0
    accountant = _accountant()
    import dp_accounting

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise)
    if sampling < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling, event)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=64)
def noise_for(target: float, rounds: int, sampling: float, delta: float) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``rounds`` rounds stay within
    ``(target, delta)``."""
    low, high = 0.01, 1.0
    while epsilon(high, rounds, sampling, delta) > target:
        high *= 2
        if high > 1e6:
            raise ConfigError(
                f"no noise multiplier keeps {rounds} rounds within epsilon {target} at delta "
                f"{delta}: raise dp_epsilon or dp_delta, or run fewer rounds"
            )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if epsilon(middle, rounds, sampling, delta) > target:
            low = middle
        else:
            high = middle
    return high


def _accountant() -> Any:
    try:
        from dp_accounting import rdp
    except ImportError as err:
        raise ConfigError(
            "differential privacy's accounting needs Google's dp-accounting: pip install "
            "'secagg[dp]' (make installs it)"
        ) from err
    return rdp.RdpAccountant()
