"""Where the network server's RPC handlers meet its round loop: one lock, one current task.

The round loop posts a *task* (train, seal, correct, apply, done) to the sites taking part; each
site long-polls for it (``next_task``), does it, and uploads its payload (``check_upload``,
``deliver``) or its report (``report``). The round loop takes the uploads as they are queued
(``collect``), at most ``INBOX`` at a time, while at most ``UPLOADS`` are being received, so the
server holds a handful of payloads whatever the number of sites. A site that stops sending
heartbeats for ``liveness`` seconds is given up on: a phase ends when every site asked has
delivered, when the ones left have gone silent, or at the round timeout.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from secagg import quantize
from secagg.crypto import ServerCipher, Stamp, report
from secagg.crypto.certified import certificate_key, check_joining_key
from secagg.errors import PayloadError, SecAggError
from secagg.messages import ModelSignature
from secagg.provision import ADMIN, Kit
from secagg.rounds import RoundFailed
from secagg.server import aggregate_paths, attempt_of
from secagg.transport.grpc_wire import Hello, MaskKey, Report, UploadHeader

INBOX = 2
UPLOADS = 2
#: The tasks a site answers with an upload: its scales, its update, its signature of the
#: survivor set, its mask reveal (self-mask key, and corrections when the phase lost sites).
UPLOADS_FOR = ("advertise", "train", "seal", "confirm", "correct", "evaluate", "average")
#: Refused uploads after which a task stops waiting for a site (an honest site that replays
#: by mistake still gets its own upload in).
STRIKES = 2
#: A site polling for a task waits at most this long for one.
POLL_SECONDS = 10.0


class Aborted(SecAggError):
    """An administrator stopped the job."""


@dataclass
class Site:
    index: int
    name: str
    #: taking part: joined with its task and model ready (its first Join only asks for the job)
    joined: bool = False
    #: its connection was logged (once, however often it asks for the job before joining)
    announced: bool = False
    last_seen: float = 0.0
    #: the last round whose aggregate this site applied
    applied: int = 0
    #: why the site stopped, in its own words (its task failed, its model is not the job's)
    error: str | None = None
    #: its signed mask key for the job and its certificate, relayed to its peers (``masking``)
    mask: MaskKey | None = None


@dataclass
class Task:
    id: int
    kind: str
    round: int
    sites: frozenset[int]
    body: dict[str, Any]
    delivered: set[int] = field(default_factory=set)
    #: refused uploads per site in this task
    strikes: dict[int, int] = field(default_factory=dict)
    #: sites the task no longer waits for (STRIKES refused uploads, or one cut for stalling);
    #: a valid upload of theirs is still taken while the task is open
    dropped: set[int] = field(default_factory=set)


@dataclass
class Upload:
    task: int
    index: int
    payload: bytes
    meta: UploadHeader


class Coordinator:
    """What the RPC handlers and the round loop share, under one condition variable."""

    def __init__(
        self,
        kit: Kit,
        cipher: ServerCipher,
        config: dict[str, Any],
        job: bytes,
        workdir: Path,
        completed: int,
        liveness: float,
        max_samples: int,
        log: Callable[[str], None] = lambda line: None,
        extra: Callable[[int], list[int]] = lambda values: [],
    ) -> None:
        self.kit = kit
        #: what every update carries beyond the job's model of so many values
        #: (``privacy.extra_sizes``)
        self.extra = extra
        #: (site, certificate) -> the key it holds, checked against the CA once (it signs the
        #: site's attempt keys every round)
        self._site_keys: dict[tuple[int, bytes], ec.EllipticCurvePublicKey] = {}
        self.cipher = cipher
        self.config = config
        self.job = job
        self.workdir = workdir
        self.completed = completed
        self.liveness = liveness
        #: the most training samples a site may claim (its FedAvg weight is n_i / N)
        self.max_samples = max_samples
        self.log = log
        self.sites = [Site(i, name) for i, name in enumerate(kit.roster)]
        self.by_name = {site.name: site for site in self.sites}
        self.lock = threading.Condition()
        self.task: Task | None = None
        self.next_id = 1
        self.inbox: queue.Queue[Upload] = queue.Queue(INBOX)
        self.uploads = threading.BoundedSemaphore(UPLOADS)
        self.reports: dict[int, Report] = {}
        self.aggregates: dict[tuple[int, str], bytes] = {}
        self.aborted: str | None = None
        self.phase = "waiting for sites"
        self.history: list[dict[str, Any]] = []
        #: the latest refusals, by site name (bounded: a flooding site cannot grow it)
        self.refusals: deque[str] = deque(maxlen=200)
        #: sites told that the job ended (done or aborted)
        self.told: set[int] = set()
        #: the model's parameter count, as the sites report it
        self.parameters: int | None = None
        #: the job's model (names, shapes, dtypes, initial weights), as the job's owner built
        #: it (``secagg.fingerprint``); every site's must equal it (``expect``)
        self.model: ModelSignature | None = None
        self._expected = threading.Event()
        #: the sites mask pairwise (``masking``): each must publish a signed mask key
        self.masking = bool(config.get("he") and config.get("masking"))
        #: tasks whose phase was corrected for dropouts, and for which sites: a late upload
        #: of theirs is refused by round state, never added
        self.closed: dict[int, tuple[int, ...]] = {}

    # --- the round loop's side ---------------------------------------------------------------

    def post(self, kind: str, round_num: int, sites: frozenset[int], **body: Any) -> Task:
        """Make ``kind`` the current task for ``sites``; earlier queued uploads are dropped."""
        with self.lock:
            task = Task(self.next_id, kind, round_num, sites, body)
            self.next_id += 1
            self.task = task
            self.reports = {}
            self.phase = f"round {round_num}: {kind}"
            while not self.inbox.empty():
                self.inbox.get_nowait()
            self.lock.notify_all()
            return task

    def ready_sites(self, round_num: int) -> list[int]:
        """Sites joined, alive and holding the global model of ``round_num - 1``."""
        with self.lock:
            return [s.index for s in self.sites if self._alive(s) and s.applied == round_num - 1]

    def wait_for_sites(
        self,
        round_num: int,
        minimum: int,
        grace: float,
        timeout: float,
        exactly: frozenset[int] | None = None,
    ) -> frozenset[int]:
        """Block until every site is ready, or ``minimum`` are and ``grace`` seconds passed;
        fewer than ``minimum`` after ``timeout`` seconds fail the round. ``exactly``: wait for
        those sites, all of them, and return them (a resumed attempt's)."""
        enough_since: float | None = None
        deadline = time.monotonic() + timeout
        while True:
            self._check_abort()
            ready = self.ready_sites(round_num)
            if exactly is not None:
                if exactly <= set(ready):
                    return exactly
                self._check_failed(round_num, ready, minimum)
                if time.monotonic() > deadline:
                    missing = ", ".join(self.sites[i].name for i in sorted(exactly - set(ready)))
                    raise RoundFailed(
                        f"round {round_num}: {missing} did not come back within {timeout:.0f} s "
                        "to finish the attempt the server was running when it stopped; start "
                        "them again (the round is tried afresh without them)"
                    )
            elif len(ready) == len(self.sites):
                return frozenset(ready)
            else:
                self._check_failed(round_num, ready, minimum)
                if len(ready) < minimum and time.monotonic() > deadline:
                    raise RoundFailed(
                        f"round {round_num}: only {len(ready)} site(s) ready within "
                        f"{timeout:.0f} s, at least {minimum} are needed"
                    )
                if len(ready) >= minimum:
                    enough_since = enough_since or time.monotonic()
                    if time.monotonic() - enough_since >= grace:
                        return frozenset(ready)
                else:
                    enough_since = None
            with self.lock:
                self.phase = (
                    f"round {round_num}: waiting for sites ({len(ready)} ready, "
                    f"at least {minimum} needed)"
                )
                self.lock.wait(0.5)

    def collect(self, task: Task, timeout: float) -> Iterator[Upload]:
        """The task's uploads as they are queued, until every site asked has delivered, the
        ones left have gone silent, or the timeout."""
        deadline = time.monotonic() + timeout
        done: set[int] = set()
        while time.monotonic() < deadline:
            self._check_abort()
            try:
                upload = self.inbox.get(timeout=0.25)
            except queue.Empty:
                with self.lock:
                    waiting = [self.sites[i] for i in task.sites - done - task.dropped]
                    if not any(self._alive(site) for site in waiting):
                        return
                continue
            if upload.task == task.id:
                done.add(upload.index)
                yield upload
                with self.lock:
                    if not task.sites - done - task.dropped:
                        return

    def collect_reports(self, task: Task, timeout: float) -> dict[int, Report]:
        """The reports of a task's sites, once all are in, the rest are silent, or timeout."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while time.monotonic() < deadline:
                self._check_abort()
                missing = [self.sites[i] for i in task.sites if i not in self.reports]
                if not missing or not any(self._alive(site) for site in missing):
                    break
                self.lock.wait(0.25)
            return dict(self.reports)

    def wait_told(self, timeout: float) -> None:
        """Wait until every live site has heard that the job ended (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while time.monotonic() < deadline:
                waiting = [s for s in self.sites if self._alive(s) and s.index not in self.told]
                if not waiting:
                    return
                self.lock.wait(0.25)

    def publish(self, round_num: int, what: str, payload: bytes) -> None:
        """Make a round's aggregate available for download (the current round's, in memory;
        earlier ones are read from the checkpoint chain)."""
        with self.lock:
            for key in [k for k in self.aggregates if k[0] < round_num]:
                del self.aggregates[key]
            self.aggregates[(round_num, what)] = payload

    def _check_failed(self, round_num: int, ready: list[int], minimum: int) -> None:
        """Fail the round at once when too many sites have failed for it ever to start."""
        with self.lock:
            failed = [s for s in self.sites if s.error and s.index not in ready]
        if failed and len(self.sites) - len(failed) < minimum:
            reasons = "; ".join(f"{s.name} failed: {s.error}" for s in failed)
            raise RoundFailed(
                f"round {round_num}: {len(failed)} of {len(self.sites)} sites failed and at "
                f"least {minimum} are needed ({reasons})"
            )

    def _check_abort(self) -> None:
        if self.aborted is not None:
            raise Aborted(self.aborted)

    def _alive(self, site: Site) -> bool:
        return site.joined and time.monotonic() - site.last_seen < self.liveness

    # --- the RPC handlers' side ---------------------------------------------------------------

    def identify(self, context: grpc.ServicerContext, admin: bool = False) -> Site | None:
        """The site (or, for ``admin``, nobody) the peer's certificate names; aborts if none."""
        names = context.auth_context().get("x509_common_name", [])
        name = names[0].decode() if names else ""
        if admin:
            if name != ADMIN:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "admin certificate required")
            return None
        site = self.by_name.get(name)
        if site is None:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate '{name}' names no site of this project's roster",
            )
        assert site is not None
        with self.lock:
            site.last_seen = time.monotonic()
        return site

    def expect(self, model: ModelSignature, parameters: int) -> None:
        """The job's model, built from the job (never a site's word): sites are checked
        against it from now on."""
        with self.lock:
            self.model, self.parameters = model, parameters
        self._expected.set()

    def join(self, site: Site, hello: Hello) -> dict[str, Any]:
        """A site asks for the job, or (``hello.model`` given) says it is ready to take part;
        a model that is not the job's is refused (PayloadError ``model-mismatch``)."""
        if hello.model is not None and not self._expected.wait(timeout=10.0):
            raise PayloadError(
                "the server is still building the job's model to check sites against; join again",
                "busy",
            )
        with self.lock:
            if hello.model is not None:
                assert self.model is not None
                difference = self.model.mismatch(hello.model)
                if difference is not None:
                    site.error = f"its model is not the job's: {difference}"
                    raise PayloadError(
                        f"{site.name}'s model is not the job's: {difference}", "model-mismatch"
                    )
                mask = self._mask_key(site, hello)
                task = self.task
                if site.mask != mask and task is not None and site.index in task.sites:
                    # Joined again with a new key (a restarted site): the current task's masks
                    # are not its own any more; the task goes on without it.
                    task.dropped.add(site.index)
                site.mask = mask
            info = {
                "job": self.job.hex(),
                "index": site.index,
                "roster": list(self.kit.roster),
                "config": self.config,
                "completed": self.completed,
                "fingerprint": self.cipher.codec.fingerprint.hex(),
            }
            site.last_seen = time.monotonic()
            if hello.model is None and site.joined:
                return info  # a joined site asking which job runs (after a lost call)
            was = site.joined
            site.joined = hello.model is not None
            site.error = None if site.joined else site.error
            site.applied = min(hello.applied, self.completed)
            site.last_seen = time.monotonic()
            self.lock.notify_all()
            if site.joined and not was:
                ready = sum(1 for s in self.sites if s.joined)
                self.log(f"{site.name} ready ({ready}/{len(self.sites)})")
            elif not site.joined and not was and not site.announced:
                site.announced = True
                self.log(f"{site.name} connected")
            return info

    def _mask_key(self, site: Site, hello: Hello) -> MaskKey | None:
        """The mask key a ready site sent: required when the job masks, and its own."""
        if not self.masking:
            return None
        if hello.mask is None:
            raise PayloadError(
                f"{site.name} sent no mask key, and this job masks (masking = true); run the "
                "same secagg release on the server and every site",
                "no-mask-key",
            )
        if hello.mask.site != site.index:
            raise PayloadError(
                f"{site.name} is site {site.index} of the roster, not {hello.mask.site}",
                "no-mask-key",
            )
        try:
            check_joining_key(
                self.kit.ca, site.name, hello.mask.signed(), hello.mask.certificate, self.job
            )
        except PayloadError as err:
            # Refused at the door: relayed, a bad key would stop every honest site.
            raise PayloadError(
                f"{site.name}'s mask key is refused, and the site is left out: {err}",
                "no-mask-key",
            ) from err
        return hello.mask

    def site_key(self, index: int) -> ec.EllipticCurvePublicKey:
        """The signing key of site ``index``'s certificate (the one its mask key came with)."""
        with self.lock:
            site = self.sites[index]
            mask = site.mask
        if mask is None:
            raise PayloadError(f"{site.name} sent no mask key", "no-mask-key")
        known = (index, mask.certificate)
        if known not in self._site_keys:
            ca = x509.load_pem_x509_certificate(self.kit.ca)
            self._site_keys[known] = certificate_key(ca, site.name, mask.certificate, whose="")
        return self._site_keys[known]

    def mask_keys(self, sites: frozenset[int]) -> list[dict[str, Any] | None]:
        """The signed mask keys of ``sites``, by position (None elsewhere), for a train task."""
        with self.lock:
            keys = [s.mask if s.index in sites else None for s in self.sites]
        return [None if key is None else key.to_wire() for key in keys]

    def close(self, task: Task, dropped: tuple[int, ...]) -> None:
        """``task``'s phase is corrected for ``dropped``: no upload of theirs for it is taken."""
        with self.lock:
            self.closed[task.id] = dropped

    def next_task(self, site: Site, after: int, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + min(wait, POLL_SECONDS)
        with self.lock:
            while True:
                site.last_seen = time.monotonic()
                task = self.task
                if self.aborted is not None:
                    self.told.add(site.index)
                    self.lock.notify_all()
                    return {"kind": "abort", "reason": self.aborted}
                if not site.joined:
                    # It joined another server process (this one restarted): it must join
                    # this one, with its model and mask key, before it is given any task.
                    return {"kind": "rejoin", "id": after}
                if site.applied < self.completed and not _applies_next(task, site):
                    # Behind (a late or rejoining site): fetch the missing rounds first.
                    return {"kind": "catchup", "completed": self.completed, "id": after}
                if task is not None and task.kind == "done":
                    self.told.add(site.index)
                    self.lock.notify_all()
                    return {"kind": "done", "id": task.id}
                if task is not None and task.id > after and site.index in task.sites:
                    body = task.body
                    if "shares" in body:  # each site gets only the shares sealed to it
                        body = {**body, "shares": body["shares"].get(str(site.index), {})}
                    return {"kind": task.kind, "id": task.id, "round": task.round, **body}
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {"kind": "wait", "id": after}
                self.lock.wait(remaining)

    def tensor_sizes(self) -> list[int]:
        """The sizes of the job's model's tensors (its signature, which every site's must
        equal)."""
        with self.lock:
            if self.model is None:
                raise RoundFailed("no site has said what the job's model is yet")
            return self._payload_sizes(self.model)

    def _payload_sizes(self, model: ModelSignature) -> list[int]:
        """The tensor sizes a round's updates carry: the job's model's, then its extras."""
        sizes = model.sizes()
        return sizes + self.extra(sum(sizes))

    def check_upload(self, site: Site, header: UploadHeader) -> tuple[Task, Stamp, int]:
        """The task an upload answers, the stamp its payload must carry and how many values
        it must hold (0: no payload), or PayloadError naming what is wrong."""
        with self.lock:
            task = self.task
            if site.index in self.closed.get(header.task, ()):
                raise PayloadError(
                    f"{site.name}'s upload is late: its round's sum was corrected for its "
                    "dropout, and a late update is never added",
                    "late-update",
                )
            if task is None or header.task != task.id or task.kind not in UPLOADS_FOR:
                raise PayloadError("upload answers no current task: stale or replayed", "stale")
            if site.index not in task.sites:
                raise PayloadError(f"site {site.name} is not asked for this round", "not-in-round")
            if site.index in task.delivered:
                raise PayloadError(
                    f"site {site.name} already delivered for this task; a duplicate or "
                    "replayed contribution is refused",
                    "duplicate",
                )
            model = self.model
        if task.kind == "train":
            try:
                self._check_count(header)
            except PayloadError:
                # Counted like any refused upload: a site that keeps at it is not waited for.
                self.drop(site, task)
                raise
        if model is None:
            raise PayloadError("no site has said what the job's model is yet", "not-in-round")
        roster = len(self.sites)
        stamp = Stamp(self.job, task.round, site.index, roster)
        if task.kind == "advertise" and not header.advert:
            raise PayloadError(
                "an advertise upload must carry the site's attempt keys", "malformed"
            )
        if task.kind == "confirm" and not header.confirmation:
            raise PayloadError("a confirm upload must carry the site's signature", "malformed")
        if task.kind == "correct" and not header.revealed:
            raise PayloadError("a correct upload must carry the site's self-mask key", "malformed")
        sizes = self._payload_sizes(model)
        if task.kind in ("advertise", "confirm", "correct", "average"):
            # Nothing but the header: attempt keys, a signature, a reveal, or averages.
            return task, stamp, 0
        if task.kind == "evaluate":
            return task, stamp.evaluation(roster), report.VALUES
        if task.kind == "seal":
            return task, stamp, sum(sizes)
        values = quantize.histogram_values(sizes) if self.cipher.quantizes else 0
        return task, stamp.scales(), values

    def _check_count(self, header: UploadHeader) -> None:
        """A training upload's plain count and metrics: a plaintext site's count within the
        job's ``max_client_samples``; an HE site's count and metrics travel encrypted in its
        scales (the clients bound the total), and in plain they are refused."""
        if self.cipher.quantizes:
            if header.samples or header.metrics:
                raise PayloadError(
                    "an HE training upload carries its sample count and metrics inside its "
                    "encrypted scales, not in plain; is the site running another secagg "
                    "version?",
                    "bad-samples",
                )
        elif not 1 <= header.samples <= self.max_samples:
            raise PayloadError(
                f"a training upload must report between 1 and {self.max_samples} samples "
                f"(the job's max_client_samples), not {header.samples}",
                "bad-samples",
            )

    def sit_out(self, site: Site, task_id: int) -> None:
        """``site`` sits out the current advertise or train task (it sent its update in an
        earlier attempt of the round), or declines its seal task (the round's summed scales
        break a bound: a site misreported its count or histogram): the task stops waiting
        for it."""
        with self.lock:
            task = self.task
            kinds = ("advertise", "train", "seal")
            if task is None or task.id != task_id or task.kind not in kinds:
                raise PayloadError(
                    "sitting out answers no current advertise, train or seal task", "stale"
                )
            task.dropped.add(site.index)
            self.lock.notify_all()
        if task.kind == "seal":
            self.log(
                f"{site.name} declines round {task.round}: the sites' summed scales break the "
                "bounds honest sites keep (a site misreported its count or its histogram)"
            )
            return
        self.log(
            f"{site.name} sits round {task.round} out: it sent its update in an earlier "
            "attempt, and never sends it twice"
        )

    def drop(self, site: Site, task: Task, at_once: bool = False) -> None:
        """Count a refused upload of ``site`` for ``task``; at ``STRIKES`` of them (or
        ``at_once``: a stalled stream) the task goes on without waiting for the site."""
        with self.lock:
            task.strikes[site.index] = task.strikes.get(site.index, 0) + 1
            if at_once or task.strikes[site.index] >= STRIKES:
                task.dropped.add(site.index)
            self.lock.notify_all()

    def deliver(self, task: Task, upload: Upload) -> None:
        with self.lock:
            if self.task is not task or upload.index in task.delivered:
                raise PayloadError("the task this upload answers is over", "stale")
            task.delivered.add(upload.index)
        try:
            self.inbox.put(upload, timeout=600)
        except queue.Full as err:
            raise PayloadError("the server is not taking payloads", "busy") from err

    def report(self, site: Site, report: Report) -> None:
        evaluation = report.evaluation
        if evaluation is not None and evaluation.num_samples > self.max_samples:
            # The round's metrics are weighted by test counts: an unbounded claim would let
            # one site set them (refused like a training count, by the job's bound).
            raise PayloadError(
                f"{site.name} reports {evaluation.num_samples} test samples, over the job's "
                f"max_client_samples ({self.max_samples}); its report is refused",
                "bad-samples",
            )
        with self.lock:
            site.applied = max(site.applied, min(report.applied, self.completed))
            task = self.task
            if task is not None and report.task == task.id and task.kind == "apply":
                self.reports[site.index] = report
            self.lock.notify_all()

    def fail(self, site: Site, error: str) -> None:
        """A site stopped taking part, and says why: it is no longer waited for."""
        with self.lock:
            site.error = error
            site.joined = False
            self.lock.notify_all()
        self.log(f"{site.name} failed: {error}")

    def download(self, round_num: int, what: str) -> bytes:
        with self.lock:
            held = self.aggregates.get((round_num, what))
        if held is not None:
            return held
        if not 1 <= round_num <= self.completed:
            raise PayloadError(f"round {round_num} has no aggregate yet", "not-found")
        if what == "attempt":
            return attempt_of(self.workdir, round_num)
        if what == "evaluation":  # summed for the current round only, never kept
            raise PayloadError(f"round {round_num}'s evaluations are not summed", "not-found")
        update, scales = aggregate_paths(self.workdir, round_num)
        chosen = scales if what == "scales" else update
        try:
            return chosen.read_bytes()
        except FileNotFoundError as err:
            raise PayloadError(f"round {round_num} has no {what} aggregate", "not-found") from err

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "project": self.kit.project,
                "job": self.config.get("job_name"),
                "job_id": self.job.hex(),
                "rounds": self.config.get("rounds"),
                "completed": self.completed,
                "phase": self.phase,
                "aborted": self.aborted,
                "sites": [
                    {
                        "name": s.name,
                        "connected": self._alive(s),
                        "applied": s.applied,
                        "error": s.error,
                    }
                    for s in self.sites
                ],
                "history": self.history[-5:],
                "refusals": list(self.refusals)[-10:],
            }

    def abort(self, reason: str) -> None:
        with self.lock:
            self.aborted = reason
            self.lock.notify_all()

    def refused(self, site: Site | None, err: PayloadError) -> None:
        """Record (``status`` shows it) and log a refusal, by site name."""
        who = site.name if site is not None else "unknown peer"
        line = f"{who}: {err.reason}: {err}"
        with self.lock:
            self.refusals.append(f"{time.strftime('%H:%M:%S')} {line}")
        self.log(f"refused {line}")


def _applies_next(task: Task | None, site: Site) -> bool:
    """Whether the current task is this site's next round to apply."""
    return (
        task is not None
        and task.kind == "apply"
        and site.index in task.sites
        and task.round == site.applied + 1
    )
