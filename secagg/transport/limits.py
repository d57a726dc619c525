"""What one site may hold of the server at once, so that no site can starve the others.

gRPC runs every call in one thread pool. A site (a stolen certificate, or a buggy site) that
opens many calls and sends nothing would hold every thread: no round, no ``secagg status``.
So each site may hold at most ``STREAMS`` upload streams and ``CALLS`` other calls at once
(more are refused at once, ``RESOURCE_EXHAUSTED``), and receive at most one payload body at a
time; the pool is sized for every site at its caps plus ``ADMIN_THREADS``, so the admin API
always finds a thread. A stream that sends nothing for ``stall`` seconds is cut (``Watchdog``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

#: Upload streams one site may have open at once (an honest site has one; two let a retry
#: overlap the end of a dying stream).
STREAMS = 2
#: Other calls one site may have in flight at once: a task poll, a heartbeat, a download and
#: a report.
CALLS = 4
#: Threads left for the admin API (Status, Abort) whatever the sites do.
ADMIN_THREADS = 4


class Busy(Exception):
    """A site is over one of its caps; the call is refused, the site's other calls go on."""


def pool_size(sites: int) -> int:
    """Threads for ``sites`` sites at their caps, and the admin API's own."""
    return sites * (STREAMS + CALLS) + ADMIN_THREADS


class SiteLimits:
    """Per-site counters of open calls (one lock for all sites: the counts are tiny)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], int] = {}

    @contextmanager
    def hold(self, site: str, kind: str) -> Iterator[None]:
        """Count one call of ``kind`` (``stream``, ``call`` or ``body``) for ``site`` while it
        runs; raise Busy when the site already holds its cap of them."""
        cap = {"stream": STREAMS, "call": CALLS, "body": 1}[kind]
        key = (site, kind)
        with self._lock:
            held = self._open.get(key, 0)
            if held >= cap:
                what = {"stream": "upload streams", "call": "calls", "body": "payloads"}[kind]
                raise Busy(f"site {site} already has {held} {what} open (at most {cap})")
            self._open[key] = held + 1
        try:
            yield
        finally:
            with self._lock:
                self._open[key] -= 1


class Watchdog:
    """Cuts a call (``context.cancel()``) that makes no progress for ``stall`` seconds or is
    still running after ``deadline`` seconds; a handler blocked reading the stream then sees
    an RpcError. ``cut`` tells afterwards whether it did."""

    def __init__(self, context: grpc.ServicerContext, stall: float, deadline: float) -> None:
        self._context = context
        self._stall = stall
        self._end = time.monotonic() + deadline
        self._last = time.monotonic()
        self._done = threading.Event()
        self._paused = False
        self.cut: str | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self._last = time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No stall is counted inside (the server, not the site, is making it wait)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self.progress()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(self._stall / 4, 1.0)):
            now = time.monotonic()
            if self._paused:
                self._last = now
            if now - self._last > self._stall:
                self.cut = f"sent nothing for {self._stall:.0f} s"
            elif now > self._end:
                self.cut = "ran past the round's deadline"
            else:
                continue
            self._context.cancel()
            return
