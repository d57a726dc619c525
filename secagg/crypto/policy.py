"""The round policy the clients enforce, whatever the server claims.

The server decides who is in a round and which of them "dropped out"; with masks alone a server
that lies about either could have a sum of one honest update unmasked and hand it to a
colluding site. So the party that runs ``secagg provision`` fixes the policy in every kit,
signed with the project CA's key (simulations take it from the job), and every client refuses,
by name, any step that breaks it:

- ``threshold`` ``t``: the fewest contributors any sum it helps unmask, or decrypts, may have.
  A client refuses to agree a round's keys with fewer than ``t`` keyed sites, to confirm or
  unmask a survivor set of fewer than ``t``, and to decrypt an aggregate of fewer than ``t``.
- ``max_round``: the most sites a round may hand keys to.
- ``protection``, ``dp_noise``, ``dp_clip``: the least a job the server sends may protect a
  site's update with (``check_job``): a lying server cannot turn HE, masks or DP off.
- ``graph_above``, ``picks``, ``pick_threshold``: rounds of more than ``graph_above`` positions
  mask over a neighbour graph (``crypto.neighbours``), where a site reveals nothing unless
  ``pick_threshold`` of its ``picks`` are in the survivor set and signed it.

Why the default ``t = max(min(n, 3), floor(2n/3) + 1)`` for rounds of up to ``n`` (Bonawitz et
al., CCS 2017, active model): a server with ``c`` colluding sites learns only sums of at least
``t - c`` honest updates, so one honest update stays hidden while ``c <= t - 2``; and two
survivor sets each confirmed by ``t`` distinct sites share more than ``c`` of them when
``2t - n > c``, so a server that shows different sites different survivor sets is caught by an
honest site that signed only one. With ``t`` near ``2n/3`` both hold for ``c`` up to about
``n/3``, and up to ``n - t`` sites (about a third) may drop out of a round.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from secagg.errors import ConfigError, PayloadError

if TYPE_CHECKING:
    from secagg.config import RunConfig

#: Rounds of more positions than this mask over a neighbour graph (``crypto.neighbours``):
#: at 200 a client of the full graph masks with 199 others, about what a graph client does
#: (its 80 picks, and about as many that picked it).
GRAPH_ABOVE = 200
#: Each site's picks in a graph round, and how many of them must survive and sign: a server
#: with a third of the sites colluding reads a given site's update with chance 2^-44.9 (a
#: fifth: 2^-84), and one site's round fails when 10% of sites drop out with chance 3e-5.
PICKS = 80
PICK_THRESHOLD = 60
#: What a kit may require of a job, from the least protection to the most.
PROTECTIONS = ("plain", "he", "masked")
_PROTECTION_WORDS = {
    "plain": "plaintext FedAvg",
    "he": "HE without pairwise masks",
    "masked": "HE with pairwise masks",
}
#: The file a provisioned kit holds the policy in, and its CA signature beside it.
POLICY_FILE = "policy.json"
SIGNATURE_FILE = "policy.sig"
_LABEL = "secagg round policy v1"


def default_threshold(sites: int) -> int:
    """The default ``t`` for rounds of up to ``sites`` sites (see the module's docstring)."""
    return max(min(sites, 3), 2 * sites // 3 + 1)


@dataclass(frozen=True)
class RoundPolicy:
    """What every client of a job enforces about the rounds it takes part in."""

    #: the fewest contributors any sum a client unmasks or decrypts may have
    threshold: int
    #: the most sites a round may hand keys to
    max_round: int
    #: rounds of more positions than this mask over a neighbour graph (``crypto.neighbours``)
    graph_above: int = GRAPH_ABOVE
    #: with the graph: how many positions each site picks to mask with
    picks: int = PICKS
    #: with the graph: how many of a site's picks must be in a survivor set and sign it before
    #: the site reveals anything for it; also how many of its shares rebuild its keys
    pick_threshold: int = PICK_THRESHOLD
    #: the least protection a site's update gets, whatever job the server sends: ``masked``
    #: (HE with pairwise masks), ``he`` (HE, masks optional) or ``plain`` (anything)
    protection: str = "masked"
    #: with differential privacy required: the least noise multiplier a job may add, and the
    #: largest clipping bound it may use (0: DP not required)
    dp_noise: float = 0.0
    dp_clip: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ConfigError("the round policy's threshold must be a whole number")
        if isinstance(self.max_round, bool) or not isinstance(self.max_round, int):
            raise ConfigError("the round policy's max_round must be a whole number")
        if not 1 <= self.threshold <= self.max_round:
            raise ConfigError(
                f"the round policy's threshold ({self.threshold}) must be between 1 and its "
                f"max_round ({self.max_round})"
            )
        if self.protection not in PROTECTIONS:
            raise ConfigError(
                f"the round policy's protection must be one of {', '.join(PROTECTIONS)}"
            )
        finite = math.isfinite(self.dp_noise) and math.isfinite(self.dp_clip)
        if (
            not finite
            or self.dp_noise < 0
            or self.dp_clip < 0
            or (bool(self.dp_noise) != bool(self.dp_clip))
        ):
            raise ConfigError(
                "the round policy's dp_noise and dp_clip must be both positive and finite (DP "
                "required) or both 0; give both to 'secagg provision --require-dp NOISE CLIP'"
            )
        for name in ("graph_above", "picks", "pick_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"the round policy's {name} must be a whole number above 0")
        if not 2 <= self.pick_threshold <= self.picks < self.graph_above:
            raise ConfigError(
                f"the round policy's pick_threshold ({self.pick_threshold}) must be between 2 "
                f"and its picks ({self.picks}), and picks below graph_above ({self.graph_above})"
            )

    def check_job(self, job: RunConfig, then: str = "this site sends nothing under it") -> None:
        """Refuse (PayloadError ``policy``) a job the server sent that protects this site's
        update less than the kits require: plaintext or unmasked where they require masked HE,
        less DP noise or a larger clip than they set. ``then``: what follows, in the error."""
        given = job.protection
        if PROTECTIONS.index(given) < PROTECTIONS.index(self.protection):
            raise PayloadError(
                f"the server's job is {_PROTECTION_WORDS[given]}, but this project's kits "
                f"require {_PROTECTION_WORDS[self.protection]} (the round policy its CA "
                f"signed): {then} (new kits from 'secagg provision --protection' change what "
                "the project requires)",
                "policy",
            )
        if not self.dp_noise:
            return
        noise = job.noise_multiplier() if job.dp else 0.0
        given_dp = f"noise multiplier {noise:.3f} with clip {job.dp_clip:g}" if job.dp else "no DP"
        unprotected = (
            "" if job.he and job.masking else " (and no HE)" if not job.he else " (and no masks)"
        )
        if unprotected or noise < self.dp_noise * (1 - 1e-9) or job.dp_clip > self.dp_clip:
            raise PayloadError(
                f"the server's job adds {given_dp}{unprotected}, but this "
                "project's kits require distributed "
                f"DP of noise multiplier at least {self.dp_noise:g} and clip at most "
                f"{self.dp_clip:g}: {then}",
                "policy",
            )

    def graph(self, roster: int) -> bool:
        """Whether a round of ``roster`` positions masks over a neighbour graph."""
        return roster > self.graph_above

    @classmethod
    def for_round_size(cls, sites: int, threshold: int = 0, graph_above: int = 0) -> RoundPolicy:
        """The policy of rounds of up to ``sites`` sites; ``threshold`` and ``graph_above`` 0:
        the defaults. A smaller ``graph_above`` than the default scales the picks with it
        (half of it, at most ``PICKS``), three quarters of which must survive."""
        graph_above = graph_above or GRAPH_ABOVE
        picks = min(PICKS, graph_above // 2)
        pick_threshold = PICK_THRESHOLD if picks == PICKS else -(-3 * picks // 4)
        return cls(threshold or default_threshold(sites), sites, graph_above, picks, pick_threshold)

    def tolerated(self) -> int:
        """How many colluding sites a lying server may have while no single honest update of a
        full round is revealed and a split view of the survivors is caught."""
        return max(0, min(self.threshold - 2, 2 * self.threshold - self.max_round - 1))

    def check_roster(self, keyed: int) -> None:
        """Refuse a round that hands keys to fewer than ``threshold`` or more than ``max_round``
        sites (PayloadError ``policy``)."""
        if keyed > self.max_round:
            raise PayloadError(
                f"the server's round hands keys to {keyed} sites, more than the {self.max_round} "
                "the job's round policy allows: this site will not take part",
                "policy",
            )
        self.check_sum(keyed, "the server's round hands keys to")

    def check_sum(self, count: int, what: str) -> None:
        """Refuse a sum of fewer than ``threshold`` contributors; ``what`` says whose claim."""
        if count < self.threshold:
            raise PayloadError(
                f"{what} {count} site(s), fewer than the round policy's threshold of "
                f"{self.threshold}: a sum that small could reveal one site's update, so this "
                "site refuses it (the server claimed it)",
                "policy",
            )

    def to_bytes(self) -> bytes:
        """The canonical bytes the CA signs."""
        body = {
            "policy": _LABEL,
            "threshold": self.threshold,
            "max_round": self.max_round,
            "graph_above": self.graph_above,
            "picks": self.picks,
            "pick_threshold": self.pick_threshold,
            "protection": self.protection,
            "dp_noise": self.dp_noise,
            "dp_clip": self.dp_clip,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundPolicy:
        """Inverse of ``to_bytes``; ConfigError naming what is wrong."""
        try:
            body = json.loads(data)
        except ValueError as err:
            raise ConfigError(f"the round policy is not valid JSON: {err}") from err
        if not isinstance(body, dict) or body.get("policy") != _LABEL:
            raise ConfigError("the round policy file is not a secagg round policy")
        # A kit made before these settings existed signed none of them: the defaults.
        return cls(
            body.get("threshold"),  # type: ignore[arg-type]
            body.get("max_round"),  # type: ignore[arg-type]
            body.get("graph_above", GRAPH_ABOVE),
            body.get("picks", PICKS),
            body.get("pick_threshold", PICK_THRESHOLD),
            body.get("protection", "masked"),
            body.get("dp_noise", 0.0),
            body.get("dp_clip", 0.0),
        )

    def save(self, folder: Path, ca_key: ec.EllipticCurvePrivateKey) -> None:
        """Write the policy and the CA's signature of it into a kit ``folder``."""
        from secagg.files import atomic_write

        data = self.to_bytes()
        atomic_write(folder / POLICY_FILE, data, mode=0o600)
        signature = ca_key.sign(data, ec.ECDSA(hashes.SHA256()))
        atomic_write(folder / SIGNATURE_FILE, signature, mode=0o600)

    @classmethod
    def load(cls, folder: Path, ca: x509.Certificate) -> RoundPolicy:
        """The kit's policy, refused (ConfigError) unless the project's CA signed it."""
        try:
            data = (folder / POLICY_FILE).read_bytes()
            signature = (folder / SIGNATURE_FILE).read_bytes()
        except FileNotFoundError as err:
            raise ConfigError(
                f"{folder} holds no signed round policy ({POLICY_FILE}, {SIGNATURE_FILE}); "
                "make the kits again with this release's 'secagg provision'"
            ) from err
        public = ca.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ConfigError("the project CA's key is not an ECDSA key")
        try:
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as err:
            raise ConfigError(
                f"{folder / POLICY_FILE} is not signed by this project's CA: it was altered; "
                "restore it from the kit 'secagg provision' made"
            ) from err
        return cls.from_bytes(data)
