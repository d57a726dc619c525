"""The user's side of a federated job: a *task* says how to build the model, where a client's
data is, how to train one round and how to evaluate. secagg calls it; it never sees a
ciphertext.

Subclass ``Task`` and override its four methods::

    class XRay(secagg.Task):
        def __init__(self, image_size: int = 224):          # the job's [task_settings] table
            self.image_size = image_size

        def build_model(self) -> nn.Module:                 # torch is seeded first: the same
            return torchvision.models.resnet18(num_classes=2)  # weights on every client

        def load_data(self, site: secagg.Site) -> Any:      # anything; handed back below
            return DataLoader(ImageFolder(site.data_dir / "train"), batch_size=32)

        def train(self, model, data, ctx: secagg.RoundContext) -> secagg.TrainResult:
            ...  # the user's own loop, on ctx.device
            return secagg.TrainResult(num_samples=len(data.dataset), metrics={"loss": loss})

        def evaluate(self, model, data, ctx) -> secagg.EvalResult | None:
            return secagg.EvalResult(loss, num_samples, {"auc": auc})

A job file names the task by import path (``task = "chest.task:XRay"``) with its settings in a
``[task_settings]`` table, passed to the constructor as keyword arguments. Around the task, the
client (``secagg.client``) owns everything federated: it loads the global model before each
round, flattens the trained model, weights its change by the sample count ``train`` reported,
encrypts, and after the round decrypts and loads the new global model.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secagg.errors import ConfigError, TaskError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from secagg.config import RunConfig


@dataclass(frozen=True)
class Site:
    """Who a client is, for ``Task.load_data``.

    ``index`` is its position in the roster (0 .. ``clients`` - 1) and ``name`` its site name
    (``site-1`` .. in a simulation, the certificate's name in a deployment). ``partition`` is
    True when ``data_dir`` holds every client's data and this client should take its own part
    of it (a simulation, or ``secagg client --shard auto``); False when ``data_dir`` is this
    site's own data (``secagg client --shard all``). ``seed`` is the job's seed and
    ``settings`` the job's ``[task_settings]`` table.
    """

    index: int
    name: str
    clients: int
    data_dir: Path
    partition: bool = True
    seed: int = 0
    download: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundContext:
    """What a task's ``train`` and ``evaluate`` know about the round.

    ``round`` counts from 1 to ``rounds``. ``config`` is the job (``local_epochs``,
    ``batch_size``, ``optimizer``, ``momentum`` are there for tasks that want them); ``lr`` is
    this round's client learning rate under the job's ``lr_schedule``, and ``proximal(model)``
    the FedProx term to add to the loss. ``seed`` is derived from the job's seed, the round and
    the client: torch's global generator is seeded from it before ``train`` runs, and
    ``generator()`` gives a generator for shuffling (``DataLoader(...,
    generator=ctx.generator())``), so a resumed run trains exactly as an uninterrupted one.
    """

    round: int
    rounds: int
    site: Site
    device: torch.device
    seed: int
    config: RunConfig
    #: the global model's parameters at the start of ``train`` (FedProx jobs), by name
    anchor: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def lr(self) -> float:
        """This round's client learning rate: the job's ``lr`` under its ``lr_schedule``
        (``constant``, ``step`` or ``cosine``; see ``secagg.optimizers.client_lr``)."""
        from secagg.optimizers import client_lr

        return client_lr(self.config, self.round)

    def proximal(self, model: nn.Module) -> torch.Tensor:
        """FedProx's proximal term, ``fedprox_mu / 2 * ||w - w_global||²`` over the model's
        trainable parameters, to add to the loss in ``train``; a zero tensor when the job's
        ``fedprox_mu`` is 0 (adding it changes nothing, bit for bit) or outside ``train``."""
        import torch

        mu = self.config.fedprox_mu
        if mu == 0 or self.anchor is None:
            return torch.zeros((), device=self.device)
        total = torch.zeros((), device=self.device)
        for name, p in model.named_parameters():  # a tied weight counts once
            if not p.requires_grad:
                continue
            if name not in self.anchor:
                raise TaskError(
                    f"proximal(model): the model has a parameter {name!r} the global model has "
                    "not; pass the model that train was given"
                )
            total = total + (p - self.anchor[name]).pow(2).sum()
        return (mu / 2) * total

    def generator(self) -> torch.Generator:
        """A fresh torch generator for this client and round (the same on every call)."""
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        torch.randint(0, 2**31 - 1, (1,), generator=generator)  # the draw that seeded torch
        return generator


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training reports.

    ``num_samples`` is the FedAvg weight (how many training examples the round used, usually
    the size of the local training set); ``metrics`` are any numbers to log (``loss`` is shown
    as the round's train loss).
    """

    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    """The global model on a client's test data: its mean ``loss``, the ``num_samples`` it
    averaged over, and any named ``metrics`` (``accuracy``, ``auc``, ``dice``...). secagg
    averages every number over the evaluating clients, weighted by ``num_samples``."""

    loss: float
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class Task:
    """A federated job's model, data, training and evaluation. Subclass it; see the module."""

    def build_model(self) -> nn.Module:
        """A new model. secagg seeds torch with the job's seed first, so every client gets the
        same initial weights (or loads the job's ``initial_model`` file over them)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_model()")

    def load_data(self, site: Site) -> Any:
        """This client's data, in any form ``train`` and ``evaluate`` accept (DataLoaders,
        Datasets...). Called once per client; keep it lazy for data larger than memory."""
        raise NotImplementedError(f"{type(self).__name__} must define load_data(site)")

    def train(self, model: nn.Module, data: Any, ctx: RoundContext) -> TrainResult:
        """Train ``model`` (the global model, already on ``ctx.device``) for one round."""
        raise NotImplementedError(f"{type(self).__name__} must define train(model, data, ctx)")

    def evaluate(self, model: nn.Module, data: Any, ctx: RoundContext) -> EvalResult | None:
        """Evaluate the global model on this client's test data; None if it has none."""
        return None


def load_task(path: str, settings: Mapping[str, Any] | None = None) -> Task:
    """The task named by ``path`` (``package.module:Name``), built with ``settings``.

    ``Name`` may be a Task subclass or a function returning a Task; either is called with the
    settings as keyword arguments. Raises ConfigError naming the part that did not resolve.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"task {path!r} is not an import path; write it as 'package.module:TaskClass'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise ConfigError(
                f"task {path!r}: no module named {err.name!r}; install its package or add its "
                "folder to PYTHONPATH"
            ) from err
        raise ConfigError(f"task {path!r}: importing {module_name} failed: {err}") from err
    except Exception as err:
        raise ConfigError(
            f"task {path!r}: importing {module_name} failed: {type(err).__name__}: {err}"
        ) from err
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"task {path!r}: module {module_name} has no {attribute!r}")
        target = getattr(target, part)
    return make_task(target, settings or {}, path)


def make_task(target: Any, settings: Mapping[str, Any], name: str) -> Task:
    """A Task from a Task instance, a Task subclass or a factory, given its settings."""
    if isinstance(target, Task):
        if settings:
            raise ConfigError(f"task {name!r} is an object, not a class: it takes no task_settings")
        return target
    if not callable(target):
        raise ConfigError(f"task {name!r} is not a Task subclass, a Task or a function")
    try:
        inspect.signature(target).bind(**settings)
    except TypeError as err:
        raise ConfigError(
            f"task {name!r} does not take these task_settings ({err}); its parameters: "
            f"{inspect.signature(target)}"
        ) from err
    except ValueError:
        pass  # no signature to check (a builtin): let the call say
    _check_types(target, settings, name)
    try:
        task = target(**settings)
    except Exception as err:
        raise TaskError(f"task {name!r} failed to start: {type(err).__name__}: {err}") from err
    if not isinstance(task, Task):
        raise ConfigError(
            f"task {name!r} gave a {type(task).__name__}, not a secagg.Task; subclass secagg.Task"
        )
    return task


def _check_types(target: Any, settings: Mapping[str, Any], name: str) -> None:
    """Refuse a setting whose value does not fit the constructor's annotation for it (the
    types a job file can hold: numbers, strings, booleans, lists, tables, their unions and
    literals), in one line, before any of the task's code runs; unannotated parameters and
    other types are left to the task."""
    try:
        function = target.__init__ if inspect.isclass(target) else target
        hints = typing.get_type_hints(function)
    except Exception:  # annotations that do not resolve here: the task checks its own
        return
    for key, value in settings.items():
        hint = hints.get(key)
        if hint is not None and _fits(hint, value) is False:
            plain = not typing.get_args(hint) and hasattr(hint, "__name__")
            shown = hint.__name__ if plain else str(hint).replace("typing.", "")
            raise ConfigError(
                f"task {name!r}: task_settings.{key} must be {shown}, not {value!r} "
                f"({type(value).__name__}), as the task's constructor declares"
            )


def _fits(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits ``hint``; None when the hint is not one a job file can hold
    (the task's own business)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(arg, value) for arg in args]
        return True if any(verdicts) else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str or hint is Path:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        inner = args[0] if origin is not tuple and args else None
        return all(_fits(inner, item) is not False for item in value) if inner else True
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, dict)
    return None


def simulated_site(config: RunConfig, index: int) -> Site:
    """Client ``index`` of a simulation: every client shares ``config.data_dir`` and takes its
    own part of it."""
    return Site(
        index,
        f"site-{index + 1}",
        config.clients,
        Path(config.data_dir),
        partition=True,
        seed=config.seed,
        download=config.download,
        settings=config.task_settings,
    )
