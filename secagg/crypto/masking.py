"""Pairwise masks inside the ciphertexts, so that no single party can read one client's update.

Every client holds the same CKKS secret key, so without masks a server that hands client A's
ciphertext to a colluding client B (or B itself, given A's ciphertext) reads A's update. Each
client ``j`` of a round therefore adds to the ``c0`` words of every ciphertext it sends (scale
histograms, update and evaluation alike: the ledger and integrity tag live in the same
ciphertexts) the mask ``PRG(b_j) + sum over k != j of +-PRG(s_jk)`` mod q, ``+`` when ``j < k``
(positions in the round), ``-`` when ``j > k``. The pairs of a whole round cancel mod q, so
the server's sum of ``c0``'s is bit for bit the unmasked sum plus the self-masks, and no byte
is added to the payloads. Anyone who decrypts ``c0_j`` alone gets ``Delta m_j + e + mask``:
uniform mod q unless they know ``b_j`` and every pairwise secret of ``j``.

The protocol is SecAgg's (Bonawitz et al., CCS 2017), in its active model, one attempt of a
round at a time:

1. **Keys for the job** (``publish``): each client's X25519 key for the job, signed with its
   site's ECDSA key, sent when it joins. Its agreements with the others seal the shares below
   (the server relays sealed shares it cannot open) and its hash picks a large round's
   neighbours (``crypto.neighbours``). It is never shared, so no rebuild exposes a round.
2. **Advertise** (``advertise``): for each attempt, before anything is masked, each client
   draws fresh X25519 mask keys and self-mask keys ``b`` for each phase (scales, update,
   evaluation), signs the public halves with the attempt's nonce, and Shamir-shares
   (``crypto.shares``, t-of-n) its three self-mask keys and its three mask keys among the
   round's positions, each share sealed to its holder, with a commitment to the ``b``'s.
3. **Agree** (``agree``, with the train task): each client checks every relayed attempt key's
   signature, agrees a pair secret per phase with every position that advertised (a position
   that did not is left out of every mask), and opens the shares sealed to it.
4. **Unmask** a phase's sum: each contributor signs the survivor set the server names
   (``confirm``; one set per phase), then, given at least the round policy's threshold of
   signatures of the same set by distinct survivors (``reveal``), sends its self-mask key, its
   shares of the other survivors' self-mask keys, and its shares of the phase's mask key of
   every advertised position that sent nothing. Never both kinds for one position: the server
   removes a survivor's self-mask (revealed, or rebuilt from shares and checked against its
   commitment), and rebuilds a dropped position's mask key (checked against its advertised
   public key) to remove its pairs with the survivors (``unmasking``). A client the server
   falsely calls dropped keeps its self-mask on; a server that shows different clients
   different sets gathers too few signatures for either.

So dropouts before upload, after it and during unmasking, up to what the threshold allows,
all leave an exact sum; a rebuilt mask key unmasks only that position's pairs in that phase of
that attempt. A client refuses to decrypt an aggregate whose contributors are not exactly the
survivors it confirmed (``check_late``), and once it sent its update in an attempt it sits out
the round's later attempts (its update in two sums would give away their difference).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.crypto import neighbours, seal_format, seeded, shares
from secagg.crypto.envelope import EVALUATION, SCALES, UPDATE_PHASE, Stamp
from secagg.crypto.policy import RoundPolicy
from secagg.errors import PayloadError

#: Bytes of an X25519 public key.
PUBLIC_BYTES = 32
#: Bytes of a signature (an ECDSA P-256 signature as r || s): a confirmation, an advert's.
SIGNATURE_BYTES = 64
#: The phases of a round, in the order an attempt's keys are advertised.
PHASES = (SCALES, UPDATE_PHASE, EVALUATION)
#: Bytes of an attempt's advertised public keys: one per phase.
ADVERT_BYTES = PUBLIC_BYTES * len(PHASES)
#: What a client shares of an attempt, in order: its self-mask key of each phase, then its
#: mask key of each phase.
_SHARED = (*(("self", phase) for phase in PHASES), *(("mask", phase) for phase in PHASES))
_SIGNED_LABEL = b"secagg mask key v1\0"
_ADVERT_LABEL = b"secagg attempt keys v1\0"
_PRG_LABEL = b"secagg pairwise mask v1\0"
_CONFIRM_LABEL = b"secagg survivors v1\0"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class SignedKey:
    """A site's X25519 public key for one job, signed with the site's ECDSA key."""

    site: int
    public: bytes
    signature: bytes


@dataclass(frozen=True)
class Advert:
    """A client's mask keys for one attempt of a round: an X25519 public key per phase
    (``PHASES``), signed with its site's key over the job, round and attempt nonce."""

    site: int
    publics: bytes
    signature: bytes

    def public(self, phase: int) -> bytes:
        """The public key of ``phase``."""
        index = PHASES.index(phase)
        return self.publics[PUBLIC_BYTES * index : PUBLIC_BYTES * (index + 1)]

    def __len__(self) -> int:
        return len(self.publics) + len(self.signature)


#: What a train task relays: each position's attempt keys (None: it advertised none).
Relayed = Sequence[Advert | None]
#: The shares sealed to one client, by sender.
Sealed = Mapping[int, bytes]


@dataclass(frozen=True)
class Advertised:
    """What a client sends for an attempt before anything is masked: its signed attempt keys,
    its shares (``_SHARED``) sealed to each holder position (relayed by the server, which
    cannot open them), and a commitment to its self-mask keys (SHA-256 of each, by phase)
    that a rebuilt key is checked against."""

    advert: Advert
    sealed: dict[int, bytes]
    commitment: bytes

    def __len__(self) -> int:
        return len(self.advert) + len(self.commitment) + sum(map(len, self.sealed.values()))


@dataclass(frozen=True)
class Reveal:
    """What one contributor sends to unmask a phase's sum: its self-mask key for the phase,
    its shares of the other survivors' self-mask keys (``shares``, by survivor: what rebuilds
    the key of a survivor that vanished before revealing it), and its shares of the phase's
    mask key of each advertised position that sent nothing (``lost``, by position: what
    removes that position's pairs)."""

    sender: int
    key: bytes
    #: the sender's signature of the survivor set (the consistency round), for byte counts
    confirmation: bytes = b""
    shares: dict[int, bytes] = field(default_factory=dict)
    lost: dict[int, bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        held = sum(map(len, self.shares.values())) + sum(map(len, self.lost.values()))
        return len(self.key) + len(self.confirmation) + held


@dataclass(frozen=True)
class MaskRoster:
    """What unmasking one attempt's phases needs, as the server holds it: each position's
    advert (None: it advertised nothing, so nobody masks with it), each advertised position's
    commitment, and what says whom each position masks with (``pairs_of``)."""

    job: bytes
    nonce: bytes
    adverts: tuple[Advert | None, ...]
    commitments: dict[int, bytes]
    #: each position's job key as (site, public key), None where none was relayed: what a
    #: neighbour graph is drawn from
    listed: tuple[tuple[int, bytes] | None, ...]
    #: the neighbour graph's picks per site (None: the full graph)
    picks: int | None
    #: sender -> its sealed shares by holder (relayed with the train task; for byte counts)
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)

    def pairs_of(self, position: int) -> frozenset[int]:
        """The advertised positions ``position`` masks with: every other one, or in a graph
        round its neighbours among them (the server asks only for the positions it lost)."""
        keyed = self.keyed
        if self.picks is None:
            return keyed - {position}
        around = neighbours.graph(self.job, self.listed, position, self.picks)[1]
        return frozenset(around & keyed) - {position}

    @property
    def keyed(self) -> frozenset[int]:
        """The positions that advertised keys for the attempt."""
        return frozenset(p for p, advert in enumerate(self.adverts) if advert is not None)

    def sealed_to(self, recipient: int) -> dict[int, bytes]:
        """The shares each advertised position sealed to ``recipient``, by sender: relayed
        with the train task, before anything is masked."""
        return {
            sender: sealed[recipient]
            for sender, sealed in self.sealed.items()
            if recipient in sealed and sender != recipient
        }

    @classmethod
    def of(
        cls,
        job: bytes,
        nonce: bytes,
        keys: Sequence[SignedKey | None],
        advertised: Sequence[Advertised | None],
        policy: RoundPolicy | None,
    ) -> MaskRoster:
        """The roster of an attempt whose positions sent ``keys`` (their job keys) and then
        ``advertised``; ``policy`` says whether the round masks over a neighbour graph."""
        graph = policy is not None and policy.graph(len(keys))
        return cls(
            job,
            nonce,
            tuple(None if a is None else a.advert for a in advertised),
            {p: a.commitment for p, a in enumerate(advertised) if a is not None},
            tuple(None if k is None else (k.site, k.public) for k in keys),
            policy.picks if graph and policy is not None else None,
            {p: a.sealed for p, a in enumerate(advertised) if a is not None},
        )


def _signed_bytes(job: bytes, site: int, public: bytes) -> bytes:
    return _SIGNED_LABEL + job + struct.pack(">I", site) + public


def _advert_bytes(job: bytes, round_num: int, nonce: bytes, site: int, publics: bytes) -> bytes:
    return (
        _ADVERT_LABEL
        + job
        + struct.pack(">IB", round_num, len(nonce))
        + nonce
        + struct.pack(">I", site)
        + publics
    )


class SimulatedIdentities:
    """ECDSA P-256 site keys for simulations (in-process, Ray), which have no certificates.

    Each simulated client signs with its own site's key and every client checks peers against
    the public halves, so the signature path runs and a substituted key is caught; it does not
    separate the parties: every site's key derives from one random ``root`` that the runner
    hands to every client (a Ray actor takes on several sites in turn)."""

    def __init__(self, root: bytes | None = None) -> None:
        self.root = root if root is not None else os.urandom(32)
        self._keys: dict[int, ec.EllipticCurvePrivateKey] = {}

    def __getstate__(self) -> dict[str, bytes]:
        return {"root": self.root}  # keys are not picklable; each process derives its own

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.root, self._keys = state["root"], {}

    def signer(self, site: int) -> ec.EllipticCurvePrivateKey:
        """The site's signing key, derived from the root."""
        if site not in self._keys:
            info = b"secagg simulated site key\0" + struct.pack(">I", site)
            wide = HKDF(hashes.SHA256(), 48, salt=None, info=info).derive(self.root)
            scalar = 1 + int.from_bytes(wide, "big") % (_P256_ORDER - 1)
            self._keys[site] = ec.derive_private_key(scalar, ec.SECP256R1())
        return self._keys[site]

    def verifier(self, site: int) -> ec.EllipticCurvePublicKey:
        """The public key every peer checks the site's signatures with."""
        return self.signer(site).public_key()

    def name(self, site: int) -> str:
        """How errors call the site: as a simulation names it."""
        return f"site-{site + 1}"


@dataclass
class _Attempt:
    """One client's state for one attempt of a round: what it advertised, and once the train
    task relayed the others' adverts, its pair secrets and the shares it holds."""

    job: bytes
    round_num: int
    nonce: bytes
    own: int
    roster: int
    #: the job keys the attempt was advertised against, by position (what a resumed attempt
    #: must show again)
    keys: tuple[tuple[int, bytes] | None, ...]
    #: position -> the secret this client's and its job keys agree (seals the shares)
    channels: dict[int, bytes]
    #: in a neighbour-graph round, this client's own picks (None: the full graph)
    picks: frozenset[int] | None
    #: every position it may mask with (all listed ones, or its graph neighbours)
    around: frozenset[int]
    #: phase -> this client's private X25519 mask key (raw bytes) and self-mask key
    private: dict[int, bytes]
    self_keys: dict[int, bytes]
    advertised: Advertised
    #: after ``agree``: position -> site of every position that advertised
    sites: dict[int, int] | None = None
    #: phase -> position -> the pair's secret
    pairs: dict[int, dict[int, bytes]] = field(default_factory=dict)
    #: sender -> its shares (``_SHARED``) for this client, opened
    held: dict[int, tuple[bytes, ...]] = field(default_factory=dict)

    @property
    def listed(self) -> dict[int, int]:
        """Position -> site, for every position the advertise step listed."""
        return {p: key[0] for p, key in enumerate(self.keys) if key is not None}


class Masker:
    """One client's pairwise masks: its per-job X25519 keys, each attempt's keys, secrets and
    held shares, and what it confirmed, revealed and sent in each round."""

    def __init__(
        self,
        signer: Callable[[int], ec.EllipticCurvePrivateKey],
        verifier: Callable[[int], ec.EllipticCurvePublicKey],
        name: Callable[[int], str] = lambda site: f"site {site}",
        policy: RoundPolicy | None = None,
    ) -> None:
        self._signer = signer
        self._verifier = verifier
        #: what this client enforces whatever the server claims (``crypto.policy``); None:
        #: only that a round hands keys to at least one other site
        self.policy = policy
        #: how errors name a site (a deployment's site names, from its kit's roster)
        self._name = name
        #: (job, site) -> this client's X25519 key for the job (raw private bytes)
        self._private: dict[tuple[bytes, int], bytes] = {}
        #: (job, round, nonce) -> the attempts of the current round this client advertised
        self._attempts: dict[tuple[bytes, int, bytes], _Attempt] = {}
        #: the attempt the last train task agreed (what masks, confirms and reveals use)
        self._current: _Attempt | None = None
        #: (job, round, nonce, phase) -> the survivor set this client confirmed (signed)
        self._confirmed: dict[tuple[bytes, int, bytes, int], tuple[int, ...]] = {}
        #: (job, round, nonce, phase) -> this client's signature of the set it confirmed
        self._signatures: dict[tuple[bytes, int, bytes, int], bytes] = {}
        #: (job, round, nonce, phase) -> the survivors it revealed its self-mask key for
        self._corrected: dict[tuple[bytes, int, bytes, int], tuple[int, ...]] = {}
        #: (job, round) -> the attempt in which this client sent its masked update: its update
        #: of that round is never sent again (another attempt could difference it)
        self._released: dict[tuple[bytes, int], bytes] = {}
        #: (job, round) -> the attempt and survivor set this client unmasked the round's scale
        #: exchange for: another attempt's is unmasked only over the same sites
        self._scales_unmasked: dict[tuple[bytes, int], tuple[bytes, tuple[int, ...]]] = {}
        self._masked: set[tuple[bytes, int, bytes, int]] = set()
        #: (job, own public key, a checked peer key) -> the pair's job secret
        self._secrets: dict[tuple[bytes, bytes, SignedKey], bytes] = {}

    def publish(self, job: bytes, site: int) -> SignedKey:
        """This client's signed X25519 public key for ``job`` as ``site`` (made on first use)."""
        raw = self._private.setdefault((job, site), _fresh())
        public = _public(raw)
        signature = self._signer(site).sign(
            _signed_bytes(job, site, public), ec.ECDSA(hashes.SHA256())
        )
        return SignedKey(site, public, signature)

    def advertise(
        self, stamp: Stamp, peers: Sequence[SignedKey | None], nonce: bytes
    ) -> Advertised:
        """This client's keys for the attempt ``nonce`` of ``stamp``'s round, and its shares of
        them sealed to the round's positions; ``peers[p]`` is position ``p``'s job key (None:
        a position that takes no part), ``stamp.sender`` this client's position. Asked again
        for the same attempt and keys (a restarted server resuming it), it answers the same."""
        if len(peers) != stamp.roster:
            raise PayloadError(
                f"the round has {stamp.roster} clients but {len(peers)} mask keys were relayed",
                "bad-plan",
            )
        released = self._released.get((stamp.job, stamp.round_num))
        if released is not None and released != nonce:
            raise PayloadError(
                f"this site already revealed its masks for round {stamp.round_num} in an earlier "
                "attempt; it sits the round out (the same update in two sums would give away "
                "their difference)",
                "sit-out",
            )
        keys = tuple(None if peer is None else (peer.site, peer.public) for peer in peers)
        earlier = self._attempts.get((stamp.job, stamp.round_num, nonce))
        if earlier is not None:
            if earlier.keys != keys or earlier.own != stamp.sender:
                raise PayloadError(
                    f"the server resumed round {stamp.round_num}'s attempt with other mask keys; "
                    "this site masks nothing twice under one attempt, and sits it out",
                    "sit-out",
                )
            return earlier.advertised
        listed = sum(peer is not None for peer in peers)
        if self.policy is not None:
            self.policy.check_roster(listed)
        elif listed < 2:
            raise PayloadError("a masked round needs at least two keyed sites", "policy")
        own = peers[stamp.sender]
        private = None if own is None else self._private.get((stamp.job, own.site))
        if own is None or private is None or _public(private) != own.public:
            who = "no key" if own is None else f"{self._name(own.site)}'s key"
            raise PayloadError(
                f"the mask key relayed for this client is not its own ({who} was relayed at its "
                "position): it was substituted on the way",
                "bad-key",
            )
        chosen, around = self._neighbours(stamp, keys)
        channels = {
            p: self._channel(stamp.job, own, private, peer)
            for p, peer in enumerate(peers)
            if peer is not None and p != stamp.sender and p in around
        }
        attempt_keys = {phase: _fresh() for phase in PHASES}
        self_keys = {phase: os.urandom(seeded.SEED_BYTES) for phase in PHASES}
        publics = b"".join(_public(attempt_keys[phase]) for phase in PHASES)
        signed = _advert_bytes(stamp.job, stamp.round_num, nonce, own.site, publics)
        advert = Advert(own.site, publics, _signature(self._signer(own.site), signed))
        secrets = [
            self_keys[phase] if kind == "self" else attempt_keys[phase] for kind, phase in _SHARED
        ]
        holders, threshold = self._holders(
            chosen, [p for p, peer in enumerate(peers) if peer is not None]
        )
        split = [shares.split(secret, holders, threshold) for secret in secrets]
        context = _share_context(stamp, nonce)
        sealed = {
            p: shares.seal(channels[p], context, stamp.sender, p, b"".join(s[p] for s in split))
            for p in holders
            if p != stamp.sender
        }
        commitment = b"".join(hashlib.sha256(self_keys[p]).digest() for p in PHASES)
        attempt = _Attempt(
            stamp.job,
            stamp.round_num,
            nonce,
            stamp.sender,
            stamp.roster,
            keys,
            channels,
            chosen,
            around,
            attempt_keys,
            self_keys,
            Advertised(advert, sealed, commitment),
        )
        if stamp.sender in holders:
            attempt.held[stamp.sender] = tuple(s[stamp.sender] for s in split)
        for old in [k for k in self._attempts if k[:2] != (stamp.job, stamp.round_num)]:
            del self._attempts[old]
        self._attempts[(stamp.job, stamp.round_num, nonce)] = attempt
        return attempt.advertised

    def _channel(self, job: bytes, own: SignedKey, private: bytes, peer: SignedKey) -> bytes:
        """The secret this client's and ``peer``'s job keys agree, the peer's signature
        checked (once per job: a peer met in an earlier round was checked then)."""
        known = (job, own.public, peer)
        if known not in self._secrets:
            verify(job, peer, self._verifier(peer.site), self._name(peer.site))
            self._secrets[known] = _agreed(private, peer.public, own.public, peer.site, self._name)
        return self._secrets[known]

    def agree(self, stamp: Stamp, adverts: Relayed, sealed: Sealed, nonce: bytes) -> None:
        """Check the attempt keys the train task relayed (``adverts[p]``: position ``p``'s,
        None for a position that advertised nothing), agree a pair secret per phase with
        every advertised neighbour, and open the shares sealed to this client (``sealed``:
        sender -> bytes; one that does not open is left out, the others rebuild without it).
        Every payload of the attempt is masked with exactly these positions."""
        attempt = self._attempts.get((stamp.job, stamp.round_num, nonce))
        if attempt is None or attempt.own != stamp.sender:
            raise PayloadError(
                f"the train task of round {stamp.round_num} names an attempt this site "
                "advertised no keys for",
                "bad-plan",
            )
        if len(adverts) != stamp.roster:
            raise PayloadError(
                f"the round has {stamp.roster} clients but {len(adverts)} attempt keys were "
                "relayed",
                "bad-plan",
            )
        if adverts[stamp.sender] != attempt.advertised.advert:
            raise PayloadError(
                "the attempt keys relayed for this client are not its own: they were "
                "substituted on the way",
                "bad-key",
            )
        sites = {}
        for position, advert in enumerate(adverts):
            if advert is None:
                continue
            if attempt.listed.get(position) != advert.site:
                raise PayloadError(
                    f"the attempt keys relayed at position {position} are "
                    f"{self._name(advert.site)}'s, which was not listed there when the attempt "
                    "was advertised",
                    "bad-key",
                )
            sites[position] = advert.site
        if self.policy is not None:
            self.policy.check_roster(len(sites))
            if attempt.picks is not None and len(attempt.picks & set(sites)) < (
                self.policy.pick_threshold
            ):
                raise PayloadError(
                    f"only {len(attempt.picks & set(sites))} of the sites this site masks with "
                    f"in round {stamp.round_num} advertised keys, fewer than the round policy's "
                    f"{self.policy.pick_threshold}: it sits the round out",
                    "sit-out",
                )
        elif len(sites) < 2:
            raise PayloadError("a masked round needs at least two keyed sites", "policy")
        pairs: dict[int, dict[int, bytes]] = {phase: {} for phase in PHASES}
        own = {p: X25519PrivateKey.from_private_bytes(attempt.private[p]) for p in PHASES}
        for position, advert in enumerate(adverts):
            if advert is None or position == stamp.sender or position not in attempt.around:
                continue
            signed = _advert_bytes(stamp.job, stamp.round_num, nonce, advert.site, advert.publics)
            _check_signature(
                self._verifier(advert.site),
                advert.signature,
                signed,
                f"{self._name(advert.site)}'s attempt keys",
            )
            own_publics = attempt.advertised.advert
            for phase in PHASES:
                pairs[phase][position] = _agreed(
                    own[phase],
                    advert.public(phase),
                    own_publics.public(phase),
                    advert.site,
                    self._name,
                )
        context = _share_context(stamp, nonce)
        for sender, blob in sealed.items():
            if sender not in sites or sender not in attempt.channels or sender in attempt.held:
                continue
            try:
                opened = shares.open_sealed(
                    attempt.channels[sender], context, sender, stamp.sender, blob
                )
            except PayloadError:
                continue
            if len(opened) == len(_SHARED) * shares.SHARE_BYTES:
                size = shares.SHARE_BYTES
                attempt.held[sender] = tuple(
                    opened[i * size : (i + 1) * size] for i in range(len(_SHARED))
                )
        attempt.sites, attempt.pairs = sites, pairs
        self._current = attempt

    def _neighbours(
        self, stamp: Stamp, keys: Sequence[tuple[int, bytes] | None]
    ) -> tuple[frozenset[int] | None, frozenset[int]]:
        """This client's picks (None in a full-graph round) and every position it may mask
        with; a graph round in which fewer than ``pick_threshold`` of its picks were listed is
        sat out (its shares could not rebuild its keys, and it would reveal nothing)."""
        everyone = frozenset(p for p, key in enumerate(keys) if key is not None)
        if self.policy is None or not self.policy.graph(stamp.roster):
            return None, everyone - {stamp.sender}
        chosen, around = neighbours.graph(stamp.job, keys, stamp.sender, self.policy.picks)
        if len(chosen) < self.policy.pick_threshold:
            raise PayloadError(
                f"only {len(chosen)} of the {self.policy.picks} sites this site masks with in "
                f"round {stamp.round_num} were handed keys, fewer than the round policy's "
                f"{self.policy.pick_threshold}: it sits the round out",
                "sit-out",
            )
        return chosen, around

    def _holders(self, picks: frozenset[int] | None, listed: list[int]) -> tuple[list[int], int]:
        """The positions this client's shares go to, and how many rebuild a key: every
        listed position, ``threshold`` of them; in a graph round its picks,
        ``pick_threshold`` of them."""
        if picks is not None and self.policy is not None:
            return sorted(picks), self.policy.pick_threshold
        threshold = self.policy.threshold if self.policy is not None else len(listed)
        return listed, min(threshold, len(listed))

    def keyed(self) -> set[int]:
        """The positions of the agreed attempt that advertised keys."""
        attempt = self._current
        return set() if attempt is None or attempt.sites is None else set(attempt.sites)

    def active(self, stamp: Stamp) -> bool:
        """Whether this client masks ``stamp``'s payload: it agreed masks for the round (an
        evaluation is masked when the round's positions evaluate it; a simulation's extra
        evaluator, which holds no keys of the round, makes it unmasked)."""
        attempt = self._current
        if attempt is None or (attempt.job, attempt.round_num) != (stamp.job, stamp.round_num):
            return False
        return stamp.phase != EVALUATION or stamp.roster == attempt.roster

    def plan(self, stamp: Stamp) -> MaskPlan:
        """What this client's mask for ``stamp``'s phase is made of (its PRG keys), so that it
        can be expanded ahead of time (``MaskPlan.words``); it marks nothing as used."""
        return self._plan(stamp)

    def mask(
        self,
        stamp: Stamp,
        count: int,
        n: int,
        modulus: int,
        prepared: tuple[MaskPlan, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``(count, n)`` words: this client's mask for the phase's ciphertexts ``0..count-1``;
        once per (round, phase): a second payload under the same mask would give away the
        difference of the two to any key holder (a retried round stops here, by name).
        ``prepared``: a plan and the words it expanded to ahead of time, used when the plan is
        still this phase's."""
        key = self._phase_key(stamp)
        if key in self._masked:
            raise PayloadError(
                f"this client already sent a masked payload for round {stamp.round_num}'s "
                "phase; masking another under the same masks would reveal their difference",
                "mask-reused",
            )
        plan = self._plan(stamp)
        self._masked.add(key)
        if stamp.phase == UPDATE_PHASE:
            # The update leaves now, under this attempt's masks, and its key may be rebuilt
            # from shares without this client: it is never sent in another attempt of the
            # round (the difference of two sums would give it away).
            self._released[(stamp.job, stamp.round_num)] = key[2]
        if prepared is not None and prepared[0] == plan and prepared[1].shape == (count, n):
            return prepared[1]
        return plan.words(count, n, modulus)

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        """Sign the survivor set the server says ``stamp``'s phase added (the consistency
        round); refused (PayloadError) when it breaks the policy, leaves this client out, or
        differs from a set this client already signed for the phase."""
        key = self._check_survivors(stamp, survivors)
        earlier = self._confirmed.get(key)
        if earlier is not None and earlier != survivors:
            raise PayloadError(
                f"the server showed this site two survivor sets for round {stamp.round_num}'s "
                f"{_phase(stamp)}: {_names(earlier, self._site_name)} and then "
                f"{_names(survivors, self._site_name)}; it signs only one",
                "inconsistent",
            )
        self._confirmed[key] = survivors
        signature = _signature(
            self._signer(self._sites()[stamp.sender]), self._confirmation(stamp, survivors)
        )
        self._signatures[key] = signature
        return signature

    def reveal(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> Reveal:
        """What unmasks ``stamp``'s phase over ``survivors``: this client's self-mask key for
        the phase, its shares of the other survivors' self-mask keys, and its shares of the
        phase's mask key of every advertised position outside ``survivors``. Only for the set
        this client confirmed, once per phase, and only when at least ``threshold`` distinct
        survivors confirmed the same set: a server that showed sites different sets gets
        nothing."""
        key = self._check_survivors(stamp, survivors)
        if self._confirmed.get(key) != survivors:
            raise PayloadError(
                f"the server asks this site to unmask round {stamp.round_num}'s "
                f"{_phase(stamp)} for {_names(survivors, self._site_name)}, a survivor set it "
                "did not confirm",
                "inconsistent",
            )
        if key in self._corrected:
            raise PayloadError(
                f"this site already unmasked round {stamp.round_num}'s {_phase(stamp)}; it "
                "does so once",
                "bad-plan",
            )
        self._check_confirmations(stamp, survivors, confirmations)
        if stamp.phase == SCALES:
            self._check_scales_retry(stamp, survivors)
        self._corrected[key] = survivors
        attempt = self._agreed(stamp)
        # Never both kinds for one position: self-mask shares of survivors only, mask-key
        # shares of the positions outside the set only.
        held = attempt.held
        slot = _SHARED.index(("self", stamp.phase))
        survivor_shares = {u: held[u][slot] for u in survivors if u != stamp.sender and u in held}
        slot = _SHARED.index(("mask", stamp.phase))
        outside = self.keyed() - set(survivors)
        lost = {d: held[d][slot] for d in sorted(outside) if d in held}
        return Reveal(
            stamp.sender,
            attempt.self_keys[stamp.phase],
            self._signatures.get(key, b""),
            survivor_shares,
            lost,
        )

    def _check_scales_retry(self, stamp: Stamp, survivors: tuple[int, ...]) -> None:
        """Unmask a round's scale exchange in a later attempt only over the sites it was
        unmasked over before: training is seeded, so two sums over sets that differ by one
        site would give that site's histogram, count and training metrics away. (Every
        honest survivor refuses, so the others cannot rebuild its key from shares.)"""
        round_key = (stamp.job, stamp.round_num)
        nonce = self._agreed(stamp).nonce
        earlier = self._scales_unmasked.get(round_key)
        if earlier is not None and earlier[0] != nonce and earlier[1] != survivors:
            raise PayloadError(
                f"this site unmasked round {stamp.round_num}'s scale exchange over "
                f"{_names(earlier[1], self._site_name)} in an earlier attempt; it does so again "
                "only over the same sites (two sums over different sites would give a site's "
                "count and metrics away), and sits this attempt out",
                "sit-out",
            )
        self._scales_unmasked[round_key] = (nonce, survivors)

    def check_late(self, stamp: Stamp, contributors: tuple[int, ...]) -> None:
        """Refuse an aggregate of fewer contributors than the policy allows; and, for a phase
        of an attempt in which this client sent a masked payload, one that does not add
        exactly the survivors it confirmed and unmasked for (a late update is never added,
        and no sum is unmasked behind its back). ``stamp.attempt`` names the attempt the
        aggregate belongs to, which its contributions' tags are checked against."""
        if self.policy is not None:
            self.policy.check_sum(len(contributors), "the aggregate adds")
        key = (stamp.job, stamp.round_num, stamp.attempt, stamp.phase)
        # The set it revealed for, or else confirmed (a survivor whose reveal came too late
        # was unmasked with: its key rebuilt from shares, over the set it signed).
        survivors = self._corrected.get(key, self._confirmed.get(key))
        if survivors is None and key in self._masked:
            raise PayloadError(
                f"the aggregate of round {stamp.round_num}'s {_phase(stamp)} was unmasked "
                "without this site, which sent a masked payload for it and confirmed no "
                "survivor set: it is not decrypted",
                "late-update",
            )
        if survivors is not None and tuple(contributors) != survivors:
            late = sorted(set(contributors) - set(survivors))
            what = (
                f"adds client(s) {late} after the round was unmasked without them: "
                if late
                else "does not add the survivors this site confirmed: "
            )
            raise PayloadError(
                f"the aggregate {what}a sum other than the confirmed one is never decrypted",
                "late-update",
            )

    def _agreed(self, stamp: Stamp) -> _Attempt:
        """The agreed attempt of ``stamp``'s round, or PayloadError ``bad-plan``."""
        attempt = self._current
        if attempt is None or attempt.sites is None or not self.active(stamp):
            raise PayloadError(f"no mask keys were agreed for round {stamp.round_num}", "bad-plan")
        return attempt

    def _sites(self) -> dict[int, int]:
        attempt = self._current
        return {} if attempt is None or attempt.sites is None else attempt.sites

    def _check_survivors(
        self, stamp: Stamp, survivors: tuple[int, ...]
    ) -> tuple[bytes, int, bytes, int]:
        """Refuse a survivor set that is not a sorted subset of the round's keyed sites with
        this client in it and at least ``threshold`` members; return the phase's key."""
        self._agreed(stamp)
        if list(survivors) != sorted(set(survivors)) or not set(survivors) <= self.keyed():
            raise PayloadError(
                f"the survivor set {list(survivors)} is not a sorted subset of the round's "
                "keyed sites",
                "bad-plan",
            )
        if stamp.sender not in survivors:
            raise PayloadError(
                "no reveal for a client that did not contribute: the survivor set leaves this "
                "site out",
                "bad-plan",
            )
        if self.policy is not None:
            self.policy.check_sum(len(survivors), f"the server says the {_phase(stamp)} added")
        return self._phase_key(stamp)

    def _phase_key(self, stamp: Stamp) -> tuple[bytes, int, bytes, int]:
        """``stamp``'s phase of the agreed attempt: what this client's per-phase state is
        kept by (its masks, confirmations and reveals)."""
        return (stamp.job, stamp.round_num, self._agreed(stamp).nonce, stamp.phase)

    def _check_confirmations(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> None:
        """At least ``threshold`` (all survivors without a policy) valid signatures of this
        survivor set by distinct survivors, or PayloadError naming the sites whose
        confirmation did not verify."""
        message = self._confirmation(stamp, survivors)
        checked, needed = self._confirmers(stamp, survivors)
        sites = self._sites()
        valid, bad = 0, []
        for position, signature in sorted(confirmations.items()):
            if position not in checked:
                continue
            if _verifies(self._verifier(sites[position]), signature, message):
                valid += 1
            else:
                bad.append(position)
        if valid < needed:
            why = (
                f"; {_names(tuple(bad), self._site_name)} signed another set (the server showed "
                "sites different survivor sets) or their confirmation was altered"
                if bad
                else ""
            )
            raise PayloadError(
                f"only {valid} of the {needed} confirmations needed of the survivor set "
                f"{_names(survivors, self._site_name)} for round {stamp.round_num}'s "
                f"{_phase(stamp)} verify{why}: this site reveals nothing",
                "inconsistent",
            )

    def _confirmers(self, stamp: Stamp, survivors: tuple[int, ...]) -> tuple[set[int], int]:
        """Whose confirmations of ``survivors`` this client checks, and how many must verify:
        any survivor's, ``threshold`` of them; in a graph round its picks', and
        ``pick_threshold`` of them, all of whom must be survivors (its update is safe while
        one honest pick's pair mask stays on it)."""
        picks = self._agreed(stamp).picks
        if picks is None or self.policy is None:
            needed = self.policy.threshold if self.policy is not None else len(survivors)
            return set(survivors), needed
        present = picks & set(survivors)
        needed = self.policy.pick_threshold
        if len(present) < needed:
            raise PayloadError(
                f"only {len(present)} of the sites this site masks with in round "
                f"{stamp.round_num} are in the survivor set of its {_phase(stamp)}, fewer than "
                f"the round policy's {needed}: this site reveals nothing for it",
                "neighbours",
            )
        return set(present), needed

    def _confirmation(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        nonce = self._agreed(stamp).nonce
        return (
            _CONFIRM_LABEL
            + stamp.job
            + struct.pack(">IBIB", stamp.round_num, stamp.phase, len(survivors), len(nonce))
            + nonce
            + struct.pack(f">{len(survivors)}I", *survivors)
        )

    def _site_name(self, position: int) -> str:
        return self._name(self._sites().get(position, position))

    def _plan(self, stamp: Stamp) -> MaskPlan:
        """The mask of ``stamp``'s phase: the pairs (a pair's words are added by the lower
        position and subtracted by the higher) and this client's self-mask."""
        attempt = self._agreed(stamp)
        pairs = attempt.pairs[stamp.phase]
        plus = tuple(
            _prg_key(pairs[p], stamp, attempt.nonce) for p in sorted(pairs) if attempt.own < p
        )
        minus = tuple(
            _prg_key(pairs[p], stamp, attempt.nonce) for p in sorted(pairs) if attempt.own > p
        )
        return MaskPlan((*plus, attempt.self_keys[stamp.phase]), minus)


@dataclass(frozen=True)
class MaskPlan:
    """The PRG keys of one client's mask in one phase: words it adds and words it subtracts.
    A pure value: expanding it (``words``) needs no state, so it can run in the background."""

    plus: tuple[bytes, ...]
    minus: tuple[bytes, ...]

    def words(self, count: int, n: int, modulus: int) -> np.ndarray:
        """``(count, n)`` words mod q: each side summed lazily, subtracted once."""
        out = seeded.expand_sum(self.plus, 0, count, n, modulus)
        minus = seeded.expand_sum(self.minus, 0, count, n, modulus)
        np.subtract(np.uint64(modulus), minus, out=minus)  # in (0, q]: adds right mod q
        seal_format.add_mod(out, minus, modulus)
        return out


def unmasking(
    stamp: Stamp, contributors: Sequence[int], reveals: Sequence[Reveal], roster: MaskRoster
) -> MaskPlan:
    """What, added to the masked sum of ``stamp``'s phase over ``contributors``, unmasks it:
    minus every contributor's self-mask (the key it revealed, or one rebuilt from the others'
    shares and checked against its commitment), and minus every advertised position's pairs
    with the contributors when it sent nothing (its mask key for the phase rebuilt from the
    shares the contributors revealed, and checked against its advert). PayloadError
    ``missing-correction`` naming the position whose key cannot be had."""
    revealed = {reveal.sender: reveal for reveal in reveals}
    plus: list[bytes] = []
    minus: list[bytes] = []
    for sender in contributors:
        reveal = revealed.get(sender)
        commitment = roster.commitments.get(sender, b"")
        if reveal is not None and committed(reveal.key, commitment, stamp.phase):
            minus.append(reveal.key)
        else:  # vanished while the round unmasked, or revealed another key
            minus.append(rebuild(sender, reveals, commitment, stamp.phase))
    survivors = set(contributors)
    for lost in sorted(roster.keyed - survivors):
        advert = roster.adverts[lost]
        assert advert is not None
        private = X25519PrivateKey.from_private_bytes(
            _rebuilt_mask_key(lost, reveals, advert.public(stamp.phase))
        )
        for peer in sorted(roster.pairs_of(lost) & survivors):
            other = roster.adverts[peer]
            assert other is not None
            secret = _agreed(
                private, other.public(stamp.phase), advert.public(stamp.phase), other.site
            )
            # ``peer`` added the pair's words when it is the lower position: take them off.
            (minus if peer < lost else plus).append(_prg_key(secret, stamp, roster.nonce))
    return MaskPlan(tuple(plus), tuple(minus))


def _rebuilt_mask_key(lost: int, reveals: Sequence[Reveal], public: bytes) -> bytes:
    """The mask key of ``lost`` (which sent nothing for the phase) from the shares of it the
    survivors revealed, checked against the public key it advertised."""
    held = {r.sender: r.lost[lost] for r in reveals if lost in r.lost}
    key = _combined(held, PUBLIC_BYTES)
    if not key or _public(key) != public:
        raise PayloadError(
            f"client {lost} sent nothing for the phase, and the {len(held)} share(s) of its "
            "mask key the survivors revealed do not rebuild the key it advertised: its pairs "
            "cannot be removed, and the sum cannot be unmasked",
            "missing-correction",
        )
    return key


def verify(
    job: bytes, signed: SignedKey, public: ec.EllipticCurvePublicKey, name: str | None = None
) -> None:
    """Refuse (``bad-key``) a mask key not signed by its site for this job; errors call the
    site ``name`` (default ``site N``)."""
    name = name or f"site {signed.site}"
    if len(signed.public) != PUBLIC_BYTES:
        raise PayloadError(f"{name}'s mask key is not {PUBLIC_BYTES} bytes", "bad-key")
    try:
        public.verify(
            signed.signature,
            _signed_bytes(job, signed.site, signed.public),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature as err:
        raise PayloadError(
            f"{name}'s mask key is not signed by its site key: it was substituted "
            "on the way (the server or the network); this client will not use it",
            "bad-key",
        ) from err


def check_advert(
    job: bytes,
    round_num: int,
    nonce: bytes,
    advert: Advert,
    public: ec.EllipticCurvePublicKey | None,
) -> None:
    """Refuse (``bad-key``) attempt keys not signed by their site's ``public`` key for this
    attempt (None: a server that cannot tell, which checks the rest), or that no agreement
    can use (a wrong length, a low-order point): what a server checks at the door, so that
    one site's bad keys leave that site out rather than stop the others."""
    if len(advert.publics) != ADVERT_BYTES:
        raise PayloadError(f"its attempt keys are not {ADVERT_BYTES} bytes", "bad-key")
    if public is not None:
        signed = _advert_bytes(job, round_num, nonce, advert.site, advert.publics)
        _check_signature(public, advert.signature, signed, "its attempt keys")
    probe = _fresh()
    for phase in PHASES:
        _agreed(probe, advert.public(phase), _public(probe), advert.site)


def _check_signature(
    public: ec.EllipticCurvePublicKey, signature: bytes, message: bytes, what: str
) -> None:
    if not _verifies(public, signature, message):
        raise PayloadError(
            f"{what} are not signed by the site's key for this attempt: substituted on the way "
            "(the server or the network) or signed wrongly; they are not used",
            "bad-key",
        )


def _verifies(public: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` (r || s) is ``public``'s ECDSA P-256 signature of ``message``."""
    try:
        if len(signature) != SIGNATURE_BYTES:
            raise ValueError("not a P-256 signature")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _signature(signer: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """``signer``'s signature of ``message`` as r || s, 32 bytes each: a fixed length (DER's
    varies), so rounds count equal bytes."""
    der = signer.sign(message, ec.ECDSA(hashes.SHA256()))
    return b"".join(n.to_bytes(32, "big") for n in decode_dss_signature(der))


def _agreed(
    private: bytes | X25519PrivateKey,
    public: bytes,
    own_public: bytes,
    site: int,
    name: Callable[[int], str] = lambda site: f"site {site}",
) -> bytes:
    """The secret of an X25519 pair: the agreement and both public keys (in order)."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as err:  # a wrong length, or a point whose agreement is all zeros
        raise PayloadError(
            f"{name(site)}'s mask key is not a usable X25519 key: it is left out", "bad-key"
        ) from err
    low, high = sorted((own_public, public))
    return shared + low + high


def _fresh() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def _public(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def _share_context(stamp: Stamp, nonce: bytes) -> bytes:
    return stamp.job + struct.pack(">I", stamp.round_num) + nonce


def rebuild(sender: int, reveals: Sequence[Reveal], commitment: bytes, phase: int) -> bytes:
    """The self-mask key of ``sender`` (which revealed nothing) from the shares the other
    survivors revealed, checked against the commitment it made when it advertised
    (PayloadError ``missing-correction`` naming it when they do not rebuild it)."""
    held = {r.sender: r.shares[sender] for r in reveals if sender in r.shares}
    key = _combined(held, seeded.SEED_BYTES)
    if not key or not committed(key, commitment, phase):
        raise PayloadError(
            f"client {sender} sent no mask reveal (or not the key it committed to), and the "
            f"{len(held)} share(s) of its key the others revealed do not rebuild it: the sum "
            "cannot be unmasked",
            "missing-correction",
        )
    return key


def _combined(held: Mapping[int, bytes], size: int) -> bytes:
    """The ``size``-byte secret the ``held`` shares rebuild (empty when there are none, or
    they rebuild no secret of that size): what the caller checks against a commitment."""
    if not held:
        return b""
    try:
        return shares.combine(held, size)
    except PayloadError:
        return b""


def committed(key: bytes, commitment: bytes, phase: int) -> bool:
    """Whether ``key`` is the one a client committed to for ``phase`` when it advertised."""
    index = PHASES.index(phase)
    return hashlib.sha256(key).digest() == commitment[32 * index : 32 * index + 32]


def _phase(stamp: Stamp) -> str:
    return {SCALES: "scale exchange", EVALUATION: "evaluation"}.get(stamp.phase, "update")


def _names(positions: tuple[int, ...], name: Callable[[int], str]) -> str:
    return "[" + ", ".join(name(p) for p in positions) + "]"


def _prg_key(secret: bytes, stamp: Stamp, nonce: bytes) -> bytes:
    info = _PRG_LABEL + stamp.job + struct.pack(">IB", stamp.round_num, stamp.phase) + nonce
    return HKDF(hashes.SHA256(), seeded.SEED_BYTES, salt=None, info=info).derive(secret)
