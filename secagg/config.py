"""Job configuration: plain frozen dataclasses, loaded from a TOML job file, overridden by flags.

Job files hold values only. Precedence: dataclass defaults < job file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from secagg.crypto.params import CkksParams
from secagg.errors import ConfigError

if TYPE_CHECKING:
    from secagg.crypto.policy import RoundPolicy
    from secagg.privacy import Privacy

__all__ = ["CkksParams", "RunConfig", "dump_job", "load_job", "type_error", "with_overrides"]

DATASETS = ("digits", "digits32", "mnist", "fashion-mnist", "cifar10")
MODELS = ("mlp", "cnn", "moderate-cnn")
OPTIMIZERS = ("sgd", "adam")
TRANSPORTS = ("inprocess", "grpc", "ray")
PRECISIONS = ("float32", "float64")
#: ``he_precision``: the packed codec's digits (``secagg.crypto.packing``)
HE_PRECISIONS = ("auto", "standard", "fine")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
LR_SCHEDULES = ("constant", "step", "cosine")
#: words in a metric's name that make a smaller value the better one (``headline_higher``)
_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "perplexity")


#: The noise multipliers (and the largest budget and clip) a DP job may give: below the least
#: the accountant's epsilon is astronomical, above the most the arithmetic overflows.
MIN_NOISE = 0.01
MAX_NOISE = 1e6


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run's records go (``RunConfig.tracking_settings``): its folder and MLflow."""

    #: log to MLflow at all
    enabled: bool
    #: the MLflow store (None: MLflow's default, ``sqlite:///mlflow.db`` here)
    uri: str | None
    experiment: str
    #: the run's folder (None: ``runs/<time>-<job>-<he|plain>``)
    output_dir: str | None
    job_name: str
    #: ``he`` or ``plain``: what a new run's folder is named after
    mode: str


@dataclass(frozen=True)
class TransportSettings:
    """How the round reaches the clients (``RunConfig.transport_settings``), and how long it
    waits for them."""

    kind: str
    ray_address: str | None
    client_cpus: float
    client_gpus: float
    #: the fewest clients a round goes on with (0: every client of the round)
    min_clients: int
    round_timeout: float
    round_retries: int


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated job needs. Defaults give the main digits job.

    The job file's format is this flat set of fields; the parts that read only a few of them
    receive typed sections instead (``tracking_settings``, ``transport_settings``,
    ``optimizers.Hyper``, ``privacy()``, ``policy()``; the cipher factories take those and the
    keys and precision), so what each reads is in its signature. The client and the task see
    all of it: a task may read any setting (``RoundContext.config``)."""

    #: the user's task by import path (``package.module:Class``); None runs the built-in
    #: classification task of ``dataset`` and ``model``
    task: str | None = None
    #: the task's own settings, passed to its constructor as keyword arguments
    task_settings: dict[str, Any] = field(default_factory=dict)
    #: a state dict (``torch.save(model.state_dict(), path)``) every party starts from, instead
    #: of the task's seeded initial weights
    initial_model: str | None = None
    #: the metric the console, results, MLflow and compare_he lead with: one the task's
    #: evaluate reports, or ``loss`` (the evaluation loss). Empty: ``accuracy`` for the
    #: built-in task, ``loss`` for a task of your own (which names its metrics itself)
    metric: str = ""
    #: whether a larger ``metric`` is better; None: no for a name holding loss, error, mse,
    #: mae or perplexity, yes for any other
    higher_is_better: bool | None = None
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    model: str = "mlp"
    #: the population: clients are numbered 0 .. clients - 1
    clients: int = 8
    #: how many clients take part in each round, drawn from the job's seed (0: all of them)
    clients_per_round: int = 0
    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    #: the client lr across rounds (``RoundContext.lr``): ``constant``, ``step`` (times
    #: ``lr_gamma`` every ``lr_step_rounds`` rounds) or ``cosine`` (from ``lr`` towards ``lr_min``)
    lr_schedule: str = "constant"
    lr_step_rounds: int = 10
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    #: FedProx: ``fedprox_mu / 2 * ||w - w_global||²`` added to the local loss
    #: (``RoundContext.proximal``); 0 is FedAvg's local objective
    fedprox_mu: float = 0.0
    #: the step every client takes with the decrypted average (``secagg.optimizers``):
    #: ``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi`` or ``fedadagrad``
    server_optimizer: str = "fedavg"
    #: the server learning rate; None: 1.0 for fedavg and fedavgm, 0.1 for the adaptive ones
    server_lr: float | None = None
    #: fedavgm's momentum
    server_momentum: float = 0.9
    #: the adaptive optimizers' decay rates and their adaptivity (denominator) constant
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    alpha: float = 1.0
    min_client_samples: int = 10
    #: the most training samples one site may report (network transport): its FedAvg weight
    #: is n_i / N, so an unbounded claim would let one site zero every other's
    max_client_samples: int = 10_000_000
    seed: int = 0
    device: str = "auto"
    #: the torch threads each client computes with, set alike by every transport, so one job
    #: gives one model in-process, on Ray and over gRPC, bit for bit (a float sum's order
    #: depends on how many threads split it). 0: the machine's cores divided by the clients
    #: per round, at least 1, as the machine each client runs on counts them
    torch_threads: int = 0
    he: bool = False
    #: with ``he``: pairwise masks inside the ciphertexts (``secagg.crypto.masking``), so that
    #: no single party, nor the server with fewer than all other clients, reads one update
    masking: bool = True
    #: with ``masking`` in a simulation: the round policy's threshold, the fewest contributors
    #: any sum a client unmasks or decrypts may have (``secagg.crypto.policy``; 0: the
    #: default, max(3, 2m/3 + 1) of the m clients per round, at most m). A deployment takes
    #: it from the kits, where ``secagg provision --threshold`` signed it
    threshold: int = 0
    #: with ``masking`` in a simulation: rounds of more clients than this mask over a
    #: neighbour graph, each client with about 2 x 80 others (``secagg.crypto.neighbours``;
    #: 0: the default, 200). A deployment takes it from the kits (``secagg provision``)
    graph_above: int = 0
    #: differential privacy (``secagg.privacy``), on when either of the next two is set: with
    #: ``he`` distributed (each site's share of the noise inside the encrypted sum), without
    #: it central (the server adds the noise to the sum it reads, and must be trusted).
    #: ``dp_noise``: the noise multiplier (the summed noise of the round policy's threshold
    #: of clients, over one client's L2 sensitivity); 0 with ``dp_epsilon``: the smallest
    #: that keeps the job's rounds within it
    dp_noise: float = 0.0
    #: the job's privacy budget at ``dp_delta`` (0: none). The run stops before a round that
    #: would take it over
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    #: the L2 bound each client clips its change to the global model to (with
    #: ``dp_clip_quantile``: the first round's)
    dp_clip: float = 1.0
    #: adaptive clipping (``secagg.privacy``, Andrew et al. 2021): the quantile of the
    #: clients' update norms the clip follows from round to round, e.g. 0.5 (0: ``dp_clip``
    #: stays fixed)
    dp_clip_quantile: float = 0.0
    #: adaptive clipping: the learning rate of the clip's geometric step
    dp_clip_rate: float = 0.2
    #: what plaintext FedAvg sends: float32 (as usual) or float64
    plain_precision: str = "float32"
    #: with ``he``: how finely updates are quantized. ``standard``: 15-bit steps, 2.6 bytes per
    #: parameter; ``fine``: 23-bit steps, 3.9 bytes per parameter (float32 plaintext: 4.0);
    #: ``auto``: standard with FedAvg, fine with any other server optimizer, which carries the
    #: rounding into later rounds or magnifies it per coordinate (``secagg.crypto.packing``)
    he_precision: str = "auto"
    keys_dir: str = "keys"
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "secagg"
    output_dir: str | None = None
    job_name: str = "digits"
    #: ``inprocess`` (clients are objects in one process) or ``grpc`` (a server process and
    #: one process per client on localhost, over mutual TLS: the deployment's code path)
    transport: str = "inprocess"
    #: ``ray``: the cluster to join (None starts a local Ray for the run)
    ray_address: str | None = None
    #: ``ray``: each client's Ray resources (fractions of a GPU let clients share one)
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    #: a round goes on without sites that do not deliver, as long as this many do (0: all)
    min_clients: int = 0
    #: seconds each phase of a round waits for the sites (network transport)
    round_timeout: float = 900.0
    #: how often a round that failed (too few sites delivered) is tried again
    round_retries: int = 3

    def validate(self) -> RunConfig:
        """Check every value where it enters; return self so calls can chain.

        Types first (a string where a number belongs would otherwise fail with a Python error
        deep inside the run), then ranges and choices."""
        for f in fields(self):
            wrong = type_error(f.name, getattr(self, f.name))
            if wrong:
                raise ConfigError(f"invalid job setting: {wrong}")
        checks: list[tuple[bool, str]] = [
            (self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}"),
            (self.model in MODELS, f"model must be one of {', '.join(MODELS)}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (1 <= self.clients <= 1_000_000, "clients must be between 1 and 1,000,000"),
            (
                0 <= self.clients_per_round <= self.clients,
                "clients_per_round must be between 0 (all clients) and clients",
            ),
            (self.rounds >= 1, "rounds must be at least 1"),
            (self.local_epochs >= 1, "local_epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}",
            ),
            (self.lr_step_rounds >= 1, "lr_step_rounds must be at least 1"),
            (0 < self.lr_gamma <= 1, "lr_gamma must be in (0, 1]"),
            (0 <= self.lr_min <= self.lr, "lr_min must be between 0 and lr"),
            (self.fedprox_mu >= 0, "fedprox_mu must be 0 (off) or positive"),
            (
                self.server_optimizer in SERVER_OPTIMIZERS,
                f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}",
            ),
            (
                self.server_lr is None or self.server_lr > 0,
                "server_lr must be positive (or unset for the optimizer's default)",
            ),
            (0 <= self.server_momentum < 1, "server_momentum must be in [0, 1)"),
            (0 <= self.beta1 < 1, "beta1 must be in [0, 1)"),
            (0 <= self.beta2 < 1, "beta2 must be in [0, 1)"),
            (self.tau > 0, "tau must be positive (it bounds the adaptive step)"),
            (self.alpha > 0, "alpha must be positive (large values approach IID)"),
            (self.min_client_samples >= 1, "min_client_samples must be at least 1"),
            (
                1 <= self.max_client_samples < 1 << 53,
                "max_client_samples must be between 1 and 2**53 (a count of examples)",
            ),
            (self.transport in TRANSPORTS, f"transport must be one of {', '.join(TRANSPORTS)}"),
            (
                self.plain_precision in PRECISIONS,
                f"plain_precision must be one of {', '.join(PRECISIONS)}",
            ),
            (
                self.he_precision in HE_PRECISIONS,
                f"he_precision must be one of {', '.join(HE_PRECISIONS)}",
            ),
            (
                0 <= self.min_clients <= self.per_round,
                "min_clients must be between 0 (all clients) and the clients per round",
            ),
            (
                0 <= self.threshold <= self.per_round,
                "threshold must be between 0 (the default) and the clients per round",
            ),
            (
                self.graph_above == 0 or self.graph_above >= 4,
                "graph_above must be 0 (the default, 200) or at least 4",
            ),
            (
                self.dp_noise == 0 or MIN_NOISE <= self.dp_noise <= MAX_NOISE,
                f"dp_noise must be 0 (off, or set by dp_epsilon) or a noise multiplier from "
                f"{MIN_NOISE} to {MAX_NOISE:,.0f}",
            ),
            (
                0 <= self.dp_epsilon <= MAX_NOISE,
                f"dp_epsilon must be 0 (no budget) or a finite budget up to {MAX_NOISE:,.0f}",
            ),
            (0 < self.dp_delta < 1, "dp_delta must be in (0, 1), well below 1 / clients"),
            (
                not self.dp or self.dp_delta < 1 / self.clients,
                f"dp_delta must be below 1 / clients ({1 / self.clients:.3g} here; delta is "
                "the chance the guarantee fails for someone), e.g. 1e-5",
            ),
            (
                0 < self.dp_clip <= MAX_NOISE,
                f"dp_clip must be a positive L2 norm up to {MAX_NOISE:,.0f}",
            ),
            (
                not (self.dp and self.he and not self.masking),
                "distributed DP with HE needs the pairwise masks (leave masking on, drop "
                "--no-masking): each site adds 1/threshold of the noise, and without masks a "
                "site that colludes with the server decrypts single updates",
            ),
            (
                0 <= self.dp_clip_quantile < 1,
                "dp_clip_quantile must be in [0, 1): 0 for a fixed clip, e.g. 0.5 to follow "
                "the median update norm",
            ),
            (0 < self.dp_clip_rate <= 10, "dp_clip_rate must be in (0, 10], e.g. 0.2"),
            (
                not self.dp_clip_quantile or self.dp,
                "dp_clip_quantile adapts differential privacy's clip: set dp_epsilon or "
                "dp_noise too (or leave it out)",
            ),
            (self.client_cpus > 0, "client_cpus must be positive"),
            (self.torch_threads >= 0, "torch_threads must be 0 (one per core per client) or more"),
            (self.client_gpus >= 0, "client_gpus must be 0 or more"),
            (self.round_timeout > 0, "round_timeout must be positive (seconds)"),
            (self.round_retries >= 0, "round_retries must be 0 or more"),
            (
                self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                "device must be auto, cpu, cuda, cuda:N or mps",
            ),
        ]
        checks += [
            (
                self.metric == "" or (self.metric.isprintable() and len(self.metric) <= 100),
                "metric must be the name of a metric the task reports (or loss)",
            ),
            (
                self.task is None or (isinstance(self.task, str) and ":" in self.task),
                "task must be an import path like 'package.module:TaskClass'",
            ),
            (
                isinstance(self.task_settings, dict),
                "task_settings must be a table of the task's own settings",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid job setting: {message}")
        if self.he:
            from secagg.crypto.packing import PACKED

            PACKED.check_clients(self.per_round)
        return self

    @property
    def precision(self) -> str:
        """What the job's cipher is built with: ``plain_precision`` without HE; with HE,
        ``he_precision`` with ``auto`` resolved (client and server resolve it alike)."""
        if not self.he:
            return self.plain_precision
        if self.he_precision != "auto":
            return self.he_precision
        return "standard" if self.server_optimizer == "fedavg" else "fine"

    @property
    def protection(self) -> str:
        """How a site's update travels: ``masked`` (HE with pairwise masks), ``he`` or
        ``plain`` (what a kit's round policy requires at least, ``crypto.policy``)."""
        return "masked" if self.he and self.masking else "he" if self.he else "plain"

    @property
    def dp(self) -> bool:
        """Whether the job adds differential privacy's noise."""
        return self.dp_noise > 0 or self.dp_epsilon > 0

    @property
    def sampling(self) -> float:
        """The fraction of clients each round asks."""
        return self.per_round / self.clients

    def noise_multiplier(self) -> float:
        """``dp_noise``, or the smallest that keeps the job's rounds within ``dp_epsilon``
        (0: no DP)."""
        if self.dp_noise > 0 or not self.dp:
            return self.dp_noise
        from secagg import privacy

        return privacy.noise_for(self.dp_epsilon, self.rounds, self.sampling, self.dp_delta)

    def epsilon_after(self, rounds: int) -> float:
        """The job's epsilon after ``rounds`` rounds at its noise multiplier, at ``dp_delta``."""
        from secagg import privacy

        return privacy.epsilon(self.noise_multiplier(), rounds, self.sampling, self.dp_delta)

    def privacy(self, threshold: int | None = None) -> Privacy | None:
        """The job's DP as clients apply it (None: off); ``threshold``: the round policy's
        (a deployment's kits'), else the simulation's."""
        if not self.dp:
            return None
        from secagg.privacy import Privacy

        t = threshold if threshold is not None else self.policy().threshold
        return Privacy(
            self.noise_multiplier(),
            self.dp_clip,
            t,
            self.dp_clip_quantile,
            self.dp_clip_rate,
            self.per_round,
        )

    def policy(self) -> RoundPolicy:
        """A simulation's round policy: rounds of ``per_round`` clients, ``threshold``,
        ``graph_above``."""
        from secagg.crypto.policy import RoundPolicy

        return RoundPolicy.for_round_size(self.per_round, self.threshold, self.graph_above)

    @property
    def headline(self) -> str:
        """The job's headline metric (``metric`` with its default resolved)."""
        if self.metric:
            return self.metric
        return "accuracy" if self.task is None else "loss"

    @property
    def headline_higher(self) -> bool:
        """Whether a larger headline metric is better (``higher_is_better`` resolved)."""
        if self.higher_is_better is not None:
            return self.higher_is_better
        name = self.headline.lower()
        return not any(word in name for word in _LOWER_IS_BETTER)

    @property
    def per_round(self) -> int:
        """How many clients take part in each round."""
        return self.clients_per_round or self.clients

    @property
    def tracking_settings(self) -> TrackingSettings:
        """What the run's records read: its folder and the MLflow store."""
        mode = "he" if self.he else "plain"
        return TrackingSettings(
            self.tracking,
            self.tracking_uri,
            self.experiment,
            self.output_dir,
            self.job_name,
            mode,
        )

    @property
    def transport_settings(self) -> TransportSettings:
        """What reaching the clients reads: the transport, Ray's resources, the waits."""
        return TransportSettings(
            self.transport,
            self.ray_address,
            self.client_cpus,
            self.client_gpus,
            self.min_clients,
            self.round_timeout,
            self.round_retries,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for results.json and MLflow parameters."""
        return dataclasses.asdict(self)


_FIELD_NAMES = {f.name for f in fields(RunConfig)}
#: each field's annotation, as written (``int``, ``str | None``, ``dict[str, Any]``...)
_KINDS = {f.name: str(f.type) for f in fields(RunConfig)}
_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number"}
#: what a value is called in a job file (TOML's names)
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}


def _fits(kind: str, value: Any) -> bool:
    if kind.endswith(" | None"):  # optional: unset, or a value of the type
        return value is None or _fits(kind.removesuffix(" | None"), value)
    if kind == "bool":  # only true/false: "no" or 0 must not switch HE on or off
        return isinstance(value, bool)
    if isinstance(value, bool):  # a bool is an int in Python, never in a job file
        return False
    if kind == "int":  # 2.5 rounds is a mistake, not 2
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float)
    if kind.startswith("dict"):
        return isinstance(value, dict)
    return isinstance(value, str)


def type_error(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the setting ``name`` (its key, the type it needs and the value,
    as a job file writes it), or None when it can."""
    kind = _KINDS[name]
    if _fits(kind, value):
        return None
    base = kind.removesuffix(" | None")
    expected = _EXPECTED.get(base, "a table" if base.startswith("dict") else "a string")
    try:
        shown = _toml(value)
    except ConfigError:
        shown = repr(value)
    what = _TOML_TYPES.get(type(value), "a table" if isinstance(value, dict) else "an array")
    return f"{name} must be {expected}, not {shown} ({what})"


def load_job(path: str | Path) -> RunConfig:
    """Read a TOML job file into a RunConfig (not yet validated).

    Keys may be written with dashes or underscores; an unknown key is an error, so a typo
    never silently falls back to a default.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"job file {path} not found; see jobs/ for examples") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"job file {path} is not valid TOML: {err}") from err
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    if isinstance(values.get("task"), dict):
        raise ConfigError(
            f"job file {path}: 'task' is the task's import path, e.g. task = "
            '"chest.task:XRay"; put the task\'s own settings in a [task_settings] table'
        )
    unknown = sorted(set(values) - _FIELD_NAMES)
    if unknown:
        raise ConfigError(
            f"job file {path} has unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_FIELD_NAMES))}"
        )
    for name, value in values.items():
        wrong = type_error(name, value)
        if wrong:
            raise ConfigError(f"job file {path}: {wrong}")
        if _KINDS[name].removesuffix(" | None") == "float" and value is not None:
            values[name] = float(value)
    values.setdefault("job_name", path.stem)
    try:
        return replace(RunConfig(), **values)
    except TypeError as err:
        raise ConfigError(f"job file {path}: {err}") from err


def dump_job(config: RunConfig) -> str:
    """A TOML job file holding ``config`` (values that are set), for ``load_job`` to read."""
    values = {key: value for key, value in config.to_dict().items() if value is not None}
    settings = values.pop("task_settings")
    lines = [f"{key} = {_toml(value)}" for key, value in values.items()]
    lines += ["", "[task_settings]"] + [f"{_key(k)} = {_toml(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """One TOML value: strings, booleans, numbers, arrays and inline tables of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, int | float):
        return repr(value)  # TOML reads Python's inf and nan too
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{value!r} cannot be written to a job file (a {type(value).__name__})")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def with_overrides(config: RunConfig, **overrides: Any) -> RunConfig:
    """Apply the flags a user actually gave (None means 'not given')."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return replace(config, **given)
