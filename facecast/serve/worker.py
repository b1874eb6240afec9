"""``facecast serve --role worker``: runs the streams the store hands it.

A worker holds no stream of its own: it watches the store (facecast/serve/store.py) for keys the
ingest says are published, takes one with a lease when it has room, and runs it as
``facecast serve`` would on a single box — reading ``live/KEY`` from the ingest and
publishing ``swapped/KEY`` back, both with the worker secret the ingest advertised — with
the key's profile as the store has it at that moment (an API change reaches a key at its
next publish).

Every POLL_S, in one loop:
1. its leases are renewed; a key it no longer holds is stopped at once (exactly one worker
   runs a key);
2. a key whose publisher left, or was replaced by a new publish, is stopped and given up;
   a stream that ended by itself is given up too (another worker, or this one, retries);
3. its heartbeat says how many streams it runs and how many it may;
4. with room, it takes one waiting key — only if no worker alive runs fewer streams
   (keys spread), and only a key seen waiting twice in a row (after a store restart the
   owner takes its keys back first, and nobody else starts them meanwhile).

A worker that dies stops renewing: its keys are free LEASE_TTL_S later and taken within a
poll. On SIGTERM it drains: it stops taking keys, stops each stream (flushing its output,
so the next worker can publish into ``swapped/KEY``) and gives the key up at once, which is
quicker than waiting out a lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Unpack

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.safety.moderation import GateOptions, GateSettings, build_gate
from facecast.serve.app import LOOPBACK, bind_host, create_app
from facecast.serve.http_server import ThreadedServer
from facecast.serve.profiles import stream_settings
from facecast.serve.store import ClusterStore, StoreError, entry_profile, store_problems
from facecast.serve.streams import StreamManager, UnknownStreamError

log = logging.getLogger(__name__)

LEASE_TTL_S = 1.5  # a dead worker's keys are free this long after its last renewal
POLL_S = 0.25
HEARTBEAT_TTL_S = 3.0
RETRY_AFTER_S = 5.0  # a key whose stream failed here is left to other workers this long


class Worker:
    def __init__(
        self,
        store: ClusterStore,
        *,
        capacity: int = 1,
        token: str | None = None,
        host: str = LOOPBACK,
        http_port: int = 8080,
        base: StreamSettings | None = None,
        worker_id: str | None = None,
        **gate: Unpack[GateOptions],
    ) -> None:
        """``gate``: ``require_consent``, ``moderation_url``, ``moderation_timeout``,
        ``audit_log``, as the ingest's (``Service``, ``GateSettings``), for the face changes
        this worker's own API takes (``POST /api/streams/KEY/source``); the consent registry
        is the store's."""
        if capacity < 1:
            raise FacecastError("a worker's capacity is at least 1 stream")
        self.store = store
        self.capacity = capacity
        self.base = base or StreamSettings()
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.manager = StreamManager()
        self.manager.checks.append(lambda: store_problems(store))
        self.manager.collectors.append(WorkerCollector(self))
        self.gate = build_gate(GateSettings(**gate), token=token, state_dir=None, store=store)
        self.app = create_app(self.manager, token, gate=self.gate)
        self.host = bind_host(host, token)
        self.http_port = http_port
        self._cache = Path(tempfile.mkdtemp(prefix="facecast-worker-"))
        self._lock = threading.Lock()
        # key -> nginx client id of the publication this worker runs it for
        self._owned: dict[str, str] = {}
        self._starting: set[str] = set()
        self._failed: dict[str, float] = {}  # key -> when its stream failed here
        self._seen_waiting: set[str] = set()
        self._draining = False
        self._store_down = False
        self._http: ThreadedServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self, stop: threading.Event) -> None:
        self._http = ThreadedServer(self.app, self.host, self.http_port)
        self._http.start()
        log.info(
            "worker %s: up to %d stream(s), store %s; HTTP on %s:%d",
            self.id,
            self.capacity,
            self.store.safe_url(),
            self.host,
            self.http_port,
        )
        try:
            while not stop.wait(POLL_S):
                self.step()
        finally:
            self.drain()
            self._http.stop()

    def drain(self) -> None:
        """Hand every key over: stop taking keys, stop each stream (its output flushed and
        closed, so the next worker can publish the key) and give the key up at once."""
        self._draining = True
        with self._lock:
            keys = sorted(self._owned)
        for key in keys:
            self._give_up(key, "draining", wait=True)
        try:
            self.store.forget_worker(self.id)
        except StoreError as exc:
            log.warning("worker %s: cannot remove its heartbeat: %s", self.id, exc)
        if keys:
            log.info("worker %s: drained, %d key(s) handed over", self.id, len(keys))

    # ------------------------------------------------------------------ the loop

    def step(self) -> None:
        """One round: renew, reconcile with what is published, beat, maybe take a key."""
        try:
            self._renew()
            published = self.store.published()
            self._reconcile(published)
            self.store.heartbeat(
                self.id, {"capacity": self.capacity, "streams": len(self._owned)}, HEARTBEAT_TTL_S
            )
            if not self._draining:
                self._take_one(published)
        except StoreError as exc:
            # Streams run on: nobody can take their keys while the store is away, and the
            # first renewal after it is back says whether they are still ours.
            if not self._store_down:
                log.warning("worker %s: store unreachable, streams go on: %s", self.id, exc)
            self._store_down = True
            return
        if self._store_down:
            log.info("worker %s: store reachable again", self.id)
        self._store_down = False

    def _renew(self) -> None:
        with self._lock:
            keys = list(self._owned)
        for key, ours in self.store.renew(keys, self.id, LEASE_TTL_S).items():
            if not ours:
                self._give_up(key, "another worker holds it", release=False)

    def _reconcile(self, published: dict[str, str]) -> None:
        with self._lock:
            owned = dict(self._owned)
            starting = set(self._starting)
        for key, client in owned.items():
            if published.get(key) != client:
                why = "its publisher left" if key not in published else "published again"
                self._give_up(key, why)
            elif key not in starting and not self._running(key):
                self._failed[key] = time.monotonic()
                self._give_up(key, "its stream ended")

    def _take_one(self, published: dict[str, str]) -> None:
        with self._lock:
            room = len(self._owned) < self.capacity
        owners = self.store.owners()
        waiting = {key for key in published if key not in owners}
        # only keys seen waiting on the last round as well (see the module's docstring)
        ready = sorted(waiting & self._seen_waiting)
        self._seen_waiting = waiting
        now = time.monotonic()
        ready = [k for k in ready if now - self._failed.get(k, -RETRY_AFTER_S) >= RETRY_AFTER_S]
        if not room or not ready:
            return
        loads = [w.get("streams", 0) for wid, w in self.store.workers().items() if wid != self.id]
        if loads and min(loads) < len(self._owned):
            return  # a less loaded worker takes it
        key = ready[0]
        if not self.store.claim(key, self.id, LEASE_TTL_S):
            return  # another worker was quicker
        with self._lock:
            self._owned[key] = published[key]
            self._starting.add(key)
        self._seen_waiting.discard(key)
        log.info("worker %s: took %s", self.id, key)
        threading.Thread(target=self._start, args=(key,), name=f"start-{key}", daemon=True).start()

    # ------------------------------------------------------------------ streams

    def _running(self, key: str) -> bool:
        try:
            return self.manager.get(key).running
        except UnknownStreamError:
            return False

    def _start(self, key: str) -> None:
        """Build and start ``key``'s stream from the store's profile and ingest address;
        a failure gives the key up (and leaves it to others for a while)."""
        try:
            entry, ingest = self.store.profile(key), self.store.ingest()
            if entry is None or ingest is None:
                raise FacecastError("no profile for it" if entry is None else "no ingest known")
            profile = entry_profile(self.store, entry, self._cache)
            base, secret = ingest["rtmp"], ingest["secret"]
            settings = stream_settings(
                self.base,
                profile,
                f"{base}/live/{key}?facecast={secret}",
                f"{base}/swapped/{key}?facecast={secret}",
            )
            self._wait_for_old(key)
            self.manager.start(key, settings, source_name=profile.source.name)
        except (FacecastError, KeyError) as exc:
            log.error("worker %s: cannot start %s: %s", self.id, key, exc)
            self._failed[key] = time.monotonic()
            self._give_up(key, "its stream could not start")
        finally:
            with self._lock:
                self._starting.discard(key)

    def _wait_for_old(self, key: str) -> None:
        """A stream of the key's last publication may still be flushing: let it finish."""
        try:
            handle = self.manager.get(key)
        except UnknownStreamError:
            return
        if handle.thread is not None:
            handle.thread.join(15)

    def _give_up(self, key: str, why: str, *, release: bool = True, wait: bool = False) -> None:
        """Stop ``key``'s stream here and, with ``release``, hand the key back."""
        with self._lock:
            if self._owned.pop(key, None) is None:
                return
        try:
            if wait:
                self.manager.stop(key)
            else:
                self.manager.release(key)
        except UnknownStreamError:
            pass  # it never got as far as starting
        if release:
            try:
                self.store.release(key, self.id)
            except StoreError as exc:  # then its lease runs out by itself
                log.warning("worker %s: cannot give %s back: %s", self.id, key, exc)
        log.info("worker %s: gave %s up (%s)", self.id, key, why)

    def streams(self) -> int:
        with self._lock:
            return len(self._owned)


class WorkerCollector(Collector):
    """``facecast_worker_capacity`` (streams it may run) and ``facecast_worker_keys`` (keys
    it holds, starting ones included): beside ``facecast_streams_active``, the numbers an
    autoscaler on streams per worker needs."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        capacity = GaugeMetricFamily(
            "facecast_worker_capacity", "Streams this worker may run at once."
        )
        capacity.add_metric([], self.worker.capacity)
        keys = GaugeMetricFamily("facecast_worker_keys", "Stream keys this worker holds.")
        keys.add_metric([], self.worker.streams())
        yield from (capacity, keys)
