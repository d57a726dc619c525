"""Transports carry bytes between the round loop and the clients.

The round loop only sees this interface, so an in-process simulation and a networked
deployment run the same round code. ``seal`` yields replies as clients finish, so the server can
add each payload as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from secagg.crypto import MaskRoster, Reveal, Stamp
from secagg.messages import ApplyReply, EvalReply, FitReply, TrainReply

#: Hears how a long step goes: ``(phase, done, total)``, e.g. ``("encrypt", 3, 8)`` when the
#: third of eight clients has encrypted. Phases of a round: train, scales, encrypt, aggregate,
#: apply, evaluate; before the rounds: clients (data loading and model set-up), tracking,
#: replay (a resumed run rebuilding its model). Optional everywhere; the CLI draws it.
Progress = Callable[[str, int, int], None]


def no_progress(phase: str, done: int, total: int) -> None:
    """The default ``Progress``: nobody is listening."""


class Transport(Protocol):
    #: how many clients the job has; they are numbered 0 .. roster - 1
    roster: int

    def tensor_sizes(self) -> list[int]:
        """How many values each tensor of the job's model holds: what sizes every payload of
        a round (never the first payload that arrives)."""
        ...

    def attempt(self, round_num: int, tries: int) -> bytes:
        """The nonce of a masked round's try ``tries`` (0: the first in this process): fresh,
        except that a network server resumes the try it was running when it stopped (its
        sites send again, byte for byte, what they sent for it)."""
        ...

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        """Have every client of the round train; return what each reported (its sample count
        and, for an integer codec, its encrypted part of the scale exchange). A masked round
        first has its clients advertise their keys for the attempt (``masking``), then relays
        every advert, and the shares sealed to each client, with the train task."""
        ...

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        """Send the clients that trained the round's sample total and summed scales; yield
        their encrypted updates as they arrive."""
        ...

    def masks(self, round_num: int) -> MaskRoster | None:
        """Round ``round_num``'s current attempt as its positions advertised it (before the
        train task): whose keys were relayed, and whom each masks with; None when the round
        does not mask. A position that advertised keys and sends nothing for a phase has its
        pairs removed by the server, from its mask key rebuilt from the contributors' shares."""
        ...

    def unmask(self, stamp: Stamp, survivors: tuple[int, ...]) -> list[Reveal]:
        """Unmask ``stamp``'s phase (``masking``): have its contributors ``survivors`` confirm
        that set (each signs it; the signatures are relayed to all of them), then reveal
        their self-mask keys, their shares of the other survivors' self-mask keys and their
        shares of the mask keys of the advertised positions that sent nothing; return the
        reveals that came (the server rebuilds a missing key from shares)."""
        ...

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        """Send the summed update (and its scales) to every client to decrypt and apply."""
        ...

    def evaluators(self, round_num: int) -> int:
        """How many clients evaluate round ``round_num``'s global model (a simulation's
        evaluator may evaluate besides the round's clients, at the last position)."""
        ...

    def evaluate(self, stamp: Stamp) -> list[EvalReply]:
        """The clients' evaluations of the global model, for ``stamp``'s evaluation phase:
        in plain (those with test data), or encrypted (every evaluating client's)."""
        ...

    def averages(self, stamp: Stamp, payload: bytes) -> list[dict[str, float]]:
        """Have the evaluating clients decrypt the summed evaluations ``payload`` and say
        what each metric averages to (the clients that can name them)."""
        ...
