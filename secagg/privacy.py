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
step) up or down at random (unbiased but for the rare redraws), and draws again until the norm
is at most ``sqrt((aC)^2 + d/4 + aC + sqrt(d)/2)`` for ``d`` values (conditional randomized
rounding, as in the DDG paper: the rounding adds to the norm in quadrature, not ``sqrt(d)/2``
outright). Each client draws
variance ``ceil(sigma_t^2 / t)``, so that a sum of ``t`` or more has at least the target,
however many dropped out: the round policy refuses smaller sums, and so does every client's
decryption (``crypto.quantized``); without masks a client colluding with the server could
decrypt single updates, so DP with HE needs them. Colluding clients that know their own noise
take it away, leaving the honest clients' share: with ``c`` colluders among
``n`` contributors, a ``(n - c) / t`` fraction of the target variance (``t - 1`` colluders of a
sum of ``t`` leave a ``1 / t`` fraction).

**The integers have room for it.** Before rounding, each client rotates its update (with
HE): random signs shared by the round, then a normalized Walsh-Hadamard transform per chunk
of ``ROTATION`` values (the DDG paper's flattening). The rotation keeps norms, so the noise
and the accounting are unchanged, and it spreads a chunk's norm evenly, so each rotated value
stays within ``ROTATED_SIGMAS x C / sqrt(ROTATION)``, 1/5 of ``C``, but with chance 1e-9 per
value (beyond it is clipped and counted, never wrapped). The steps are set from that bound, never
from the data (each client reports it as its largest value in every block of the scale
exchange, so the exchange leaks nothing), and leave room for twelve standard deviations of
the summed noise in the codec's range: a sum wraps with chance below ``10^-32`` per value.
Steps set from the bound rather than from ``C`` are finer, so the rounding adds less to the
sensitivity: at 100 clients the summed noise is 1.3 times central DP's instead of 1.7
(``sqrt(n / t)``, 1.22, is the floor). The per-client standard deviation stays at most
``MAX_SIGMA`` by coarser steps, which only moves the rounding further below the noise. An
update is padded with zeros to a whole number of chunks (``extra_sizes``).

**Adaptive clipping** (``quantile`` above 0: Andrew, Thakkar, McMahan and Ramaswamy,
NeurIPS 2021). ``C`` follows a quantile of the update norms instead of staying where the job
set it: each client appends one value to its clipped change, ``+bC`` when its norm was at most
``C`` and ``-bC`` when it was clipped, and the value is summed, noised and decrypted with the
update. Every client reads the noised fraction ``f`` of clients under ``C`` from the same sum
and takes the same geometric step, ``C <- C exp(-rate (f - quantile))``; so does a client that
rejoins, replaying the aggregates. The value rides inside the update, so the mechanism is one
Gaussian mechanism on the vector ``(clipped change, +-bC)`` of L2 norm at most ``C sqrt(1 +
b^2)``, noised ``z`` times that: the accountant's ``epsilon`` is unchanged (Andrew et al.'s
separate count noise and adjusted multiplier amount to the same thing, done exactly). ``b`` is
chosen so that the count's noise has standard deviation ``m / 20`` for ``m`` clients a round,
Andrew et al.'s choice, unless that would cost the update more than ``MAX_SIGNAL_COST`` more
noise; then the count is noisier (few clients a round, large ``z``: the clip then wanders).

**Accounting** (``epsilon``): Google's ``dp-accounting`` (RDP), the Gaussian mechanism with
noise multiplier ``z`` per round, Poisson-subsampled at ``clients_per_round / clients`` (an
approximation of secagg's fixed-size sampling, as in DP-FedAvg; exact with every client in
every round), composed over rounds; the neighbouring datasets differ by one client's whole
data added or removed (user-level DP; replacing it can move the sum by ``2C``: half the
multiplier's guarantee). The sum of discrete Gaussians differs from a Gaussian by a term below
``10^-60`` at the variances used (each client's is at least 16), which the accountant leaves
out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from secagg.errors import ConfigError, PayloadError

if TYPE_CHECKING:
    from secagg.config import RunConfig

#: The largest standard deviation of one client's noise (``secagg.noise`` keeps its exact
#: arithmetic within 64 bits up to it).
MAX_SIGMA = 4096

#: Standard deviations of the summed noise kept free in the codec's integer range.
HEADROOM_SIGMAS = 12
#: The least variance a client draws (the sum of discrete Gaussians is then a Gaussian to
#: within ``10^-60``; see the module docstring).
MIN_VARIANCE = 16
#: Adaptive clipping: the most its signal may add to a client's sensitivity (10 %).
MAX_SIGNAL_COST = 1.10


#: The name of what a DP update carries after the model's values (``extra_sizes``).
EXTRA = "secagg.dp"
#: Values rotated together (a power of two): a DP update with HE is a whole number of them.
ROTATION = 1024
#: A rotated value of a chunk of L2 norm ``C`` stays within ``ROTATED_SIGMAS x C /
#: sqrt(ROTATION)`` but with chance ``2 exp(-ROTATED_SIGMAS^2 / 2)`` (1e-9); beyond, it is
#: clipped (and counted), never wrapped.
ROTATED_SIGMAS = 6.5


def extra_sizes(model_values: int, config: RunConfig) -> list[int]:
    """What every update of the job carries after the model's ``model_values`` values, as
    tensor sizes (``[]``: nothing): with DP and adaptive clipping its signal (one value, the
    first), and with DP and HE the zeros that make the update a whole number of rotation
    chunks. Every party sizes the round's payloads with it."""
    if not config.dp:
        return []
    signal = 1 if config.dp_clip_quantile > 0 else 0
    padding = -(model_values + signal) % ROTATION if config.he else 0
    return [signal + padding] if signal + padding else []


def described(config: RunConfig) -> str:
    """A job's differential privacy in words, for headers and banners ("": none)."""
    if not config.dp:
        return ""
    given = []
    if config.dp_noise:
        given.append(f"noise multiplier {config.dp_noise:g}")
    if config.dp_epsilon:
        given.append(f"epsilon {config.dp_epsilon:g} at delta {config.dp_delta:g}")
    clip = f"clip {config.dp_clip:g}"
    if config.dp_clip_quantile:
        clip += f" adapting to the {config.dp_clip_quantile:g} quantile"
    kind = "distributed DP" if config.he else "central DP (the server adds the noise)"
    return f"{kind}, {', '.join(given)}, {clip}"


@dataclass(frozen=True)
class Privacy:
    """A job's distributed DP, as every client applies it."""

    #: noise multiplier: the summed noise of ``threshold`` clients over one client's sensitivity
    noise: float
    #: the L2 bound of one client's change, in the model's units
    clip: float
    #: the fewest contributors any sum has (the round policy's)
    threshold: int
    #: adaptive clipping: the quantile of the update norms ``clip`` follows (0: fixed)
    quantile: float = 0.0
    #: adaptive clipping: the geometric step's learning rate
    rate: float = 0.2
    #: adaptive clipping: the clients a round asks (how noisy their count may be)
    per_round: int = 1

    @property
    def adaptive(self) -> bool:
        """Whether ``clip`` follows a quantile of the update norms (an extra value a client)."""
        return self.quantile > 0

    @property
    def signal(self) -> float:
        """Adaptive clipping: the appended value's magnitude over ``clip`` (``b``; 0 when
        fixed), so that the count's noise is ``per_round / 20`` where that costs at most
        ``MAX_SIGNAL_COST`` (``sqrt(1 + b^2)``) more noise on the update."""
        if not self.adaptive:
            return 0.0
        most = math.sqrt(MAX_SIGNAL_COST**2 - 1)
        # the count's noise, z sqrt(1 + b^2) / (2b), at per_round / 20
        room = (self.per_round / 10) ** 2 - self.noise**2
        return most if room <= 0 else min(most, self.noise / math.sqrt(room))

    @property
    def sensitivity(self) -> float:
        """The L2 norm of what a client adds, in the model's units: its clipped change, and
        with adaptive clipping its signal."""
        return self.clip * math.sqrt(1 + self.signal**2)

    def clip_change(self, change: np.ndarray) -> float:
        """Scale ``change`` in place to an L2 norm of at most ``clip``; return its norm before."""
        norm = math.sqrt(float(np.square(change).sum()))  # no BLAS threads (noise.round_within)
        if norm > self.clip:
            change *= self.clip / norm
        return norm

    def as_update(self, change: np.ndarray, norm: float, size: int) -> np.ndarray:
        """``change`` (clipped) as an update of ``size`` values (``extra_sizes``): with
        adaptive clipping the signal after it, ``+bC`` when ``norm`` (before clipping) was
        within the clip and ``-bC`` when it was not; then zeros."""
        update = np.zeros(size)
        update[: change.size] = change
        if self.adaptive:
            update[change.size] = self.signal * self.clip * (1.0 if norm <= self.clip else -1.0)
        return update

    def rotated_peak(self) -> float:
        """The largest magnitude a rotated value of a client's update takes (but with chance
        1e-9; beyond it is clipped): its L2 bound spread over a rotation chunk."""
        return ROTATED_SIGMAS * self.sensitivity / math.sqrt(ROTATION)

    def below(self, mean_signal: float) -> float:
        """The fraction of a round's clients whose change was within the clip, read from the
        average of their signals (noised: clamped to ``[0, 1]``)."""
        return min(1.0, max(0.0, (mean_signal / (self.signal * self.clip) + 1) / 2))

    def after(self, below: float) -> Privacy:
        """The next round's DP: the clip stepped towards ``quantile`` (Andrew et al.'s
        geometric update) given the fraction ``below`` of clients that were within it."""
        return replace(self, clip=self.clip * math.exp(-self.rate * (below - self.quantile)))

    def rounded_norm(self, weight: float, step: float, values: int) -> float:
        """The L2 norm no client's rounded integers exceed (its sensitivity) when it weighs
        its change ``weight`` and rounds ``values`` of them on ``step``: with ``A = weight x
        sensitivity / step`` the largest norm before rounding, ``sqrt(A^2 + d/4 + A + sqrt(d)/2)``.
        Randomized rounding adds ``d/4`` in expectation, in quadrature, where rounding to the
        nearest could add ``sqrt(d)/2`` to the norm; a client draws its rounding again until
        it is within the bound (``noise.round_within``, the DDG paper's conditional rounding),
        so the bound holds always."""
        scaled = weight / step * self.sensitivity
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
                f"a noise multiplier of {self.noise:.3g} leaves the codec no room for the "
                f"round's {clients} updates: it needs a smaller multiplier (lower dp_noise, or "
                "raise dp_epsilon), more sites a round, or, with the standard precision, "
                "he_precision fine (--he-precision fine: 256 times the room)",
                "dp-range",
            )
        while low < high:  # the largest level that fits (fits is monotone in it)
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low


def central_noise(privacy: Privacy, clients: int, count: int, signal: float = 0.0) -> np.ndarray:
    """Central DP's noise for a plaintext sum of ``clients`` updates each weighed
    ``1 / clients``: standard deviation ``noise x sensitivity / clients`` per value, the same
    noise multiplier as the distributed mechanism's. With adaptive clipping the clip moves, and
    ``signal`` (the largest magnitude of the updates' last value, ``b C / clients``) gives the
    round's: the server, trusted with the updates under central DP, reads it off them. Drawn
    exactly as the sites' noise is (a discrete Gaussian of standard deviation ``MAX_SIGMA``,
    scaled: a grid 4,096 times finer than the deviation, from the OS's CSPRNG)."""
    from secagg.noise import discrete_gaussian

    if privacy.adaptive:
        deviation = privacy.noise * signal * math.sqrt(1 + privacy.signal**-2)
    else:
        deviation = privacy.noise * privacy.sensitivity / clients
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
    # The accountant logs (through absl) when a series it sums at one order converges slowly;
    # it then uses the other orders, which bound epsilon all the same: not the user's concern.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant.compose(event, rounds)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


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
