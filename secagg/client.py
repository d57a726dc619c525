"""A federated client: the user's task inside, the federated part around it.

The task (``secagg.task``) builds the model, loads this client's data, trains one round and
evaluates; the client never trains. Around it the client owns what makes the round federated
and private: it loads the global model before the task trains, flattens the trained model,
keeps its change to the global model, weights it by its share of the round's samples
(``p_i = n_i / N``, from the counts every client's ``train`` reported), encrypts it, and after
the server has added every client's ciphertext, decrypts the sum, checks it, divides by the
summed weight, takes the job's server-optimizer step with that average and loads the new
global model. The server only adds (it needs no plaintext multiply), and the divisor counts
exactly the clients whose updates were summed, so a client that dropped out does not skew the
average.

Every client holds the same global model, bit for bit: the packed codec's aggregates decrypt to
exact integers, identical on every client, and so is everything computed from them, the server
optimizer's step and state included (``secagg.optimizers``: the server optimizer runs on the
clients). A client that rejoins replays the rounds' aggregates to reach the same model and
optimizer state.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import nn

from secagg import messages
from secagg.config import RunConfig
from secagg.crypto import ClientCipher, Identities, Stamp, Update
from secagg.crypto.masking import Advert, Advertised, Reveal, SignedKey
from secagg.errors import ConfigError, PayloadError, SecAggError, TaskError
from secagg.files import atomic_write
from secagg.flatten import Layout, describe, flatten, payload_layout, unflatten
from secagg.messages import (
    EVAL_LOSS,
    ApplyReply,
    EvalReply,
    FitReply,
    ModelSignature,
    Seconds,
    TrainReply,
    first_difference,
)
from secagg.models import seed_torch
from secagg.optimizers import Hyper, ServerOptimizer, positions_of
from secagg.task import EvalResult, RoundContext, Site, Task, TrainResult

if TYPE_CHECKING:
    from secagg.crypto.quantized import Agreement

T = TypeVar("T")


@dataclass
class _Trained:
    """A client's change to the global model after training, until the round seals it."""

    stamp: Stamp
    change: np.ndarray
    num_samples: int


def signature_of(vector: np.ndarray, layout: Layout) -> ModelSignature:
    """What every party's initial model must share: its layout, and a digest of its flat
    weights (``flatten``)."""
    digest = hashlib.sha256(vector.tobytes()).hexdigest()[:32]
    return ModelSignature(describe(layout), digest)


class Client:
    """One party: its task and data, its copy of the global model, its client-side cipher."""

    def __init__(
        self,
        task: Task,
        site: Site,
        config: RunConfig,
        make_cipher: Callable[[Layout], ClientCipher],
        device: torch.device,
    ) -> None:
        self.task = task
        self.site = site
        self.config = config
        self.device = device
        self.model = self._call("build_model", lambda: build_model(task, config)).to(device)
        #: the global model as a flat vector, identical on every client
        self.global_vector, self.layout = flatten(self.model.state_dict())
        self.signature = signature_of(self.global_vector, self.layout)
        self.data = self._call("load_data", lambda: task.load_data(site))
        #: what an update carries: the model, and with DP adaptive clipping's signal and the
        #: rotation's padding (``privacy.extra_sizes``)
        self.payload_layout = payload_layout(self.layout, config)
        self.cipher = make_cipher(self.payload_layout)
        #: differential privacy as this round applies it: its clip moves with adaptive
        #: clipping, the same on every client (it follows the aggregates)
        self.privacy = self.cipher.privacy
        #: the server optimizer's step and state (``secagg.optimizers``), on the parameters
        parameters = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        self.server_optimizer = ServerOptimizer(
            Hyper.of(config), positions_of(self.layout, parameters)
        )
        self._trained: _Trained | None = None
        #: what this client's last encrypted evaluation measured (None: it had no test data)
        self._evaluated: dict[str, float] | None = None

    def check_model(self, job: ModelSignature) -> None:
        """Refuse to take part with a model that is not the job's (ConfigError)."""
        difference = job.mismatch(self.signature)
        if difference is not None:
            raise ConfigError(f"{self.site.name}'s model is not the job's: {difference}")

    def become(self, site: Site) -> None:
        """Take on another client's identity and data, keeping the global model: how a
        simulation's few reusable clients stand in for a large population."""
        if site == self.site:
            return
        self.site = site
        self._trained = None
        self.data = None  # the previous client's data goes before the next one's comes
        self.data = self._call("load_data", lambda: self.task.load_data(site))

    def context(self, round_num: int, anchor: bool = False) -> RoundContext:
        """What the task is told about round ``round_num``; with ``anchor``, a copy of the
        global model's parameters for ``RoundContext.proximal`` (FedProx jobs only)."""
        # Seeded per (job, round, client): a resumed run trains exactly as an uninterrupted one.
        seed = self.config.seed * 1_000_003 + round_num * 1009 + self.site.index
        anchored = None
        if anchor and self.config.fedprox_mu > 0:
            anchored = {
                name: p.detach().clone()
                for name, p in self.model.named_parameters(remove_duplicate=False)
            }
        return RoundContext(
            round_num, self.config.rounds, self.site, self.device, seed, self.config, anchored
        )

    def mask_key(self, job: bytes) -> SignedKey | None:
        """This client's signed key-agreement key for ``job`` (published when it joins), or
        None when its cipher does not mask."""
        return self.cipher.publish(job, self.site.index)

    def advertise(
        self, stamp: Stamp, peers: Sequence[SignedKey | None], nonce: bytes
    ) -> Advertised | None:
        """Before a masked attempt: this client's signed keys for attempt ``nonce`` of
        ``stamp``'s round and its shares of them, sealed to the round's positions
        (``peers``: the round's signed job keys by position, relayed with the task); None
        when its cipher does not mask."""
        return self.cipher.advertise(stamp, peers, nonce)

    def train(
        self,
        stamp: Stamp,
        adverts: Sequence[Advert | None] = (),
        sealed: Mapping[int, bytes] | None = None,
        nonce: bytes = b"",
    ) -> TrainReply:
        """Step 1 of a round: the task trains from the global model; keep the change, and for
        an integer codec return its encrypted part of the scale exchange. ``stamp`` is the
        round's, with this client's position in the round as its sender; ``adverts`` the
        attempt's signed keys by position, relayed with the task (none: no masks), ``sealed``
        the shares the others sealed to this client, and ``nonce`` the round's attempt (a
        round tried again masks afresh)."""
        start = time.perf_counter()
        if adverts:
            # Checked before any work: a substituted key stops this client here.
            self.cipher.agree(stamp, adverts, sealed or {}, nonce)
        # Always from the global model: a round tried again (the server restarted, or too few
        # sites delivered) must not start from this client's own earlier attempt.
        self.model.load_state_dict(unflatten(self.global_vector, self.layout))
        # The cipher prepares this round's encryptions in the background while the task trains.
        self.cipher.privacy = self.privacy
        self.cipher.precompute(stamp)
        ctx = self.context(stamp.round_num, anchor=True)
        seed_torch(int(torch.randint(0, 2**31 - 1, (1,), generator=_seeded(ctx.seed))))
        self.model.train()
        result = self._call("train", lambda: self.task.train(self.model, self.data, ctx))
        samples = self._samples(result)
        _sync(self.device)
        trained = time.perf_counter()
        change = self._change()
        privacy = self.privacy
        if privacy is not None:
            # DP: the change clipped to the job's L2 bound, weighed like every other site's
            # (a sample count has no bound, so no sensitivity).
            norm = privacy.clip_change(change)
            samples = 1
            change = privacy.as_update(change, norm, self.payload_layout.size)
        flattened = time.perf_counter()
        metrics = self._metrics(result.metrics, "train")
        if privacy is not None and privacy.adaptive:
            # The clip every client used this round (the same on all: train_dp_clip).
            metrics["dp_clip"] = privacy.clip
        scales = self.cipher.prepare(change, stamp, samples, metrics)
        self._trained = _Trained(stamp, change, samples)
        seconds = Seconds(
            train=trained - start,
            flatten=flattened - trained,
            prepare=time.perf_counter() - flattened,
        )
        if scales is not None:
            # An integer codec carries the count and the metrics inside the encrypted scales:
            # the server reads neither (``crypto.report``).
            samples, metrics = 0, {}
        return TrainReply(stamp.sender, samples, scales, metrics, seconds)

    def seal(self, stamp: Stamp, total_samples: int, scales: bytes | None) -> FitReply:
        """Step 3: weight the change by ``n_i / total_samples``, and encrypt it (an integer
        codec quantizes it first, on the steps agreed in ``scales``). ``stamp`` is the one
        ``train`` was given."""
        trained = self._trained
        if trained is None or trained.stamp != stamp:
            raise PayloadError(
                f"{self.site.name} has no trained update for round {stamp.round_num}",
                "bad-plan",
            )
        start = time.perf_counter()
        agreement = self.cipher.agreement(stamp, scales)
        metrics: dict[str, float] = {}
        if agreement is not None:
            # The total is the one the clients encrypted, never the server's word.
            total_samples, metrics = self._total(agreement), agreement.metrics or {}
        if not 0 < trained.num_samples <= total_samples:
            raise PayloadError(
                f"{self.site.name} trained on {trained.num_samples} samples, the round "
                f"counts {total_samples} in all; the round's sample total is wrong",
                "bad-plan",
            )
        self._trained = None
        weight = trained.num_samples / total_samples
        values = trained.change
        values *= weight
        payload = self.cipher.encrypt(Update(values, weight), trained.stamp, scales)
        seconds = Seconds(encrypt=time.perf_counter() - start)
        return FitReply(stamp.sender, payload, seconds, len(payload), metrics)

    def _total(self, agreement: Agreement) -> int:
        """The round's sample total from its encrypted scales, refused (``bad-total``) when
        more than its sites could have trained on (each at most the job's
        ``max_client_samples``): the bound a server that cannot read the counts no longer
        checks per site. The sum passed its integrity tag, so a site lied, not the server:
        a network site declines the round rather than stopping."""
        self._bounded(agreement.samples, len(agreement.contributors), "training", "bad-total")
        return agreement.samples

    def _bounded(self, claimed: int, sites: int, what: str, reason: str) -> None:
        """Refuse a sum of ``sites`` sites' counts over ``sites x max_client_samples``."""
        bound = self.config.max_client_samples
        if claimed > sites * bound:
            raise PayloadError(
                f"the round's {sites} site(s) claim {claimed} {what} examples in all, over "
                f"{sites} x the job's max_client_samples ({bound}): a site misreported its "
                "count (each honest site's task is held to the bound at its own site)",
                reason,
            )

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        """This client's signature of the survivor set the server says ``stamp``'s phase
        added (``stamp`` names this client's position): the consistency round."""
        return self.cipher.confirm(stamp, survivors)

    def reveal(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> Reveal:
        """What unmasks the phase's sum over ``survivors``, once enough of them confirmed the
        same set: this client's self-mask key, its shares of the other survivors' self-mask
        keys, and its shares of the mask keys of the positions that sent nothing."""
        return self.cipher.reveal(stamp, survivors, confirmations)

    def apply(self, payload: bytes, round_stamp: Stamp, scales: bytes | None) -> ApplyReply:
        """Decrypt the summed update, check its ledger, divide by the total weight, take the
        job's server-optimizer step with that average, and add the step to the global model."""
        start = time.perf_counter()
        optimizer = self.server_optimizer
        if optimizer.stateful and round_stamp.round_num != optimizer.steps + 1:
            # A stateful step depends on every earlier aggregate: skipping or repeating one
            # would leave this client's model different from every other client's.
            raise PayloadError(
                f"{self.site.name} has applied {optimizer.steps} rounds and was given "
                f"round {round_stamp.round_num}'s aggregate; {optimizer.hyper.name} needs "
                "every round's aggregate, in order",
                "out-of-order",
            )
        aggregate = self.cipher.decrypt(payload, round_stamp, scales)
        if aggregate.values.shape != (self.payload_layout.size,):
            raise PayloadError(
                f"global update has {aggregate.values.size} values, this client's model has "
                f"{self.payload_layout.size}; are all parties running the same job?",
                "wrong-length",
            )
        # float64, the same bits on every client: the packed codec decrypts exact integers.
        average = aggregate.values / aggregate.weight
        model, extra = average[: self.layout.size], average[self.layout.size :]
        if self.privacy is not None and self.privacy.adaptive:
            # The next round's clip, from the noised count every client reads alike.
            self.privacy = self.privacy.after(self.privacy.below(float(extra[0])))
        update = optimizer.update(model)
        decrypted = time.perf_counter()
        self.model.load_state_dict(unflatten(self.global_vector + update, self.layout))
        self.global_vector = flatten(self.model.state_dict())[0]
        seconds = Seconds(decrypt=decrypted - start, unflatten=time.perf_counter() - decrypted)
        return ApplyReply(
            self.site.index, seconds, aggregate.clipped, aggregate.weight, aggregate.contributors
        )

    def evaluate(self, stamp: Stamp, unmasked: bool = False) -> EvalReply | None:
        """The task's evaluation of the global model on this client's test data, if it has
        any. With an integer codec it is encrypted for ``stamp``'s evaluation phase (``stamp``
        names this client's position), zeros when it has no test data, so that the sum counts
        every client: nothing of it travels in plain. A client that masks sends it masked
        or not at all (``unmasked``: a simulation's extra evaluator holds no round keys)."""
        ctx = self.context(stamp.round_num)
        self.model.eval()
        result = self._call("evaluate", lambda: self.task.evaluate(self.model, self.data, ctx))
        reply = None if result is None else self._evaluation(result)
        measured = None if reply is None else {**reply.metrics, EVAL_LOSS: reply.loss}
        count = 0 if reply is None else reply.num_samples
        payload = self.cipher.evaluation(stamp, measured, count, unmasked)
        if payload is None:
            return reply
        self._evaluated = measured
        return EvalReply(stamp.sender, math.nan, 0, {}, payload)

    def averages(self, stamp: Stamp, payload: bytes) -> dict[str, float] | None:
        """The round's evaluations summed (``payload``, of ``stamp``'s evaluation phase),
        decrypted and averaged over the clients that evaluated, weighted by their test counts
        (the loss under ``EVAL_LOSS``); None when this client did not evaluate (it cannot name
        the metrics) or the clients evaluated different metrics. Refuses a sum whose clients
        claim more test examples than ``max_client_samples`` each."""
        if self._evaluated is None:
            return None
        reading = self.cipher.averages(payload, stamp, self._evaluated)
        self._bounded(reading.count, reading.sites, "test", "bad-samples")
        return reading.averages

    def _evaluation(self, result: object) -> EvalReply:
        self._returned(
            result, EvalResult, "evaluate", "EvalResult(loss, num_samples, metrics) or None"
        )
        assert isinstance(result, EvalResult)
        samples = self._count(
            result.num_samples, "evaluate", "how many test examples it averaged over"
        )
        loss = self._metrics({"loss": result.loss}, "evaluate")["loss"]
        return EvalReply(self.site.index, loss, samples, self._metrics(result.metrics, "evaluate"))

    def model_bytes(self) -> bytes:
        """The decrypted global model as a serialized state dict on the CPU."""
        buffer = io.BytesIO()
        state = {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}
        torch.save(state, buffer)
        return buffer.getvalue()

    def save(self, path: Path) -> Path:
        """The decrypted global model as a state dict file (temp file, then rename)."""
        return atomic_write(path, self.model_bytes())

    # --- checking what the task returned ---------------------------------------------------

    def _call(self, what: str, step: Callable[[], T]) -> T:
        """Run one of the task's methods; name the site and the method if it raises."""
        try:
            return step()
        except SecAggError:
            raise
        except Exception as err:
            raise TaskError(
                f"{self.site.name}: the task's {what} raised {type(err).__name__}: {err}"
            ) from err

    def _samples(self, result: object) -> int:
        self._returned(result, TrainResult, "train", "TrainResult(num_samples=..., metrics={...})")
        assert isinstance(result, TrainResult)
        samples = self._count(
            result.num_samples, "train", "how many training examples it used", ": the FedAvg weight"
        )
        if samples > self.config.max_client_samples:
            raise TaskError(
                f"{self.site.name}: the task's train reported {samples} samples, over the job's "
                f"max_client_samples ({self.config.max_client_samples}); raise the bound in the "
                "job if the site really has that many"
            )
        return samples

    def _returned(self, result: object, kind: type, method: str, usage: str) -> None:
        """Refuse a task method's result of the wrong type, saying what to return."""
        if not isinstance(result, kind):
            raise TaskError(
                f"{self.site.name}: the task's {method} returned a {type(result).__name__}; "
                f"return secagg.{usage}"
            )

    def _count(self, samples: object, method: str, meaning: str, note: str = "") -> int:
        """A sample count a task reported, refused unless a whole number above 0."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise TaskError(
                f"{self.site.name}: the task's {method} reported {samples!r} samples; report "
                f"{meaning} (a whole number above 0{note})"
            )
        return samples

    def _metrics(self, values: object, what: str) -> dict[str, float]:
        try:
            return messages.metrics(values)
        except PayloadError as err:
            raise TaskError(f"{self.site.name}: the task's {what} metrics: {err}") from err

    def _change(self) -> np.ndarray:
        """The trained model's change to the global model, refused if not finite."""
        vector, layout = flatten(self.model.state_dict())
        if layout != self.layout:
            difference = first_difference(describe(self.layout), describe(layout))
            raise TaskError(
                f"{self.site.name}: the task's train changed the model's structure ({difference})"
                "; train the model in place"
            )
        change = vector - self.global_vector
        if not np.isfinite(change).all():
            bad = next(
                e.name
                for e in self.layout.entries
                if not np.isfinite(change[e.offset : e.offset + e.size]).all()
            )
            raise TaskError(
                f"{self.site.name}: the trained model holds NaN or infinite values (first in "
                f"{bad!r}): training diverged; lower the learning rate. Nothing was sent"
            )
        return change


def build_model(task: Task, config: RunConfig) -> nn.Module:
    """The job's initial model: the task's, built with torch seeded by the job's seed, with the
    job's ``initial_model`` weights loaded over it when it names one."""
    seed_torch(config.seed)
    model = task.build_model()
    if not isinstance(model, nn.Module):
        raise TaskError(f"the task's build_model returned a {type(model).__name__}, not a module")
    if config.initial_model:
        path = Path(config.initial_model)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except FileNotFoundError as err:
            raise ConfigError(
                f"initial_model {path} not found; give the path of a state dict"
            ) from err
        except Exception as err:
            raise ConfigError(
                f"initial_model {path} does not fit the task's model: {err}; save it with "
                "torch.save(model.state_dict(), path) from the same model"
            ) from err
    return model


def simulated_ciphers(
    config: RunConfig, identities: Identities | None
) -> Callable[[Layout], ClientCipher]:
    """A simulation's cipher factory (in-process or a Ray actor): the job's keys, round policy
    and differential privacy, masks signed with ``identities`` (None: no masks)."""
    from secagg import crypto

    return crypto.for_client(
        config.he,
        config.keys_dir,
        config.precision,
        identities,
        config.policy(),
        config.privacy(),
    )


def use_threads(config: RunConfig) -> int:
    """Set this process's torch threads for the job's clients (``RunConfig.torch_threads``);
    return how many."""
    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.per_round)
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    return device


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
