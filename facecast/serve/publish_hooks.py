"""nginx's publish hooks: who may publish which stream key, and what a publish starts and
ends.

A publisher pushes ``rtmp://HOST/live/KEY``. nginx asks the HTTP plane (``on_publish``)
whether KEY may publish; a key with a profile is accepted and its pipeline starts, reading
``live/KEY`` and publishing ``swapped/KEY`` with the profile's face. When the publisher
stops (``on_publish_done``) the pipeline stops; the stream stays listed as ended (status,
metrics) for the manager's retention, and a new publish on the key replaces it. When nginx
dies, every publisher was cut, and their streams end as if each had stopped.

On a cluster's ingest (``store``) a publish starts no pipeline here: the key is announced
in the store for a worker to take, and kept announced while it is published.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.serve.app import LOOPBACK
from facecast.serve.profiles import Profile
from facecast.serve.store import ClusterStore, StoreError, cluster_view
from facecast.serve.streams import StreamManager, UnknownStreamError

log = logging.getLogger(__name__)

# A cluster's ingest tells the store every PUBLISHED_REFRESH_S which keys are published,
# each good for PUBLISHED_TTL_S: the keys of an ingest that died are gone that much later.
PUBLISHED_REFRESH_S, PUBLISHED_TTL_S = 1.0, 5.0


class PublishHooks:
    """The hook routes of one service, and the publisher accepted on each key.
    ``settings_for(key)``: the stream settings of ``key``'s profile as it is now."""

    def __init__(
        self,
        profiles: dict[str, Profile],
        manager: StreamManager,
        store: ClusterStore | None,
        settings_for: Callable[[str], StreamSettings],
    ) -> None:
        self.profiles = profiles
        self.manager = manager
        self.store = store
        self.settings_for = settings_for
        # A per-run secret, known only to this process and the nginx it starts (its config
        # is mode 0600), in the hook URL: only that nginx can start or stop streams.
        self.secret = secrets.token_urlsafe(32)
        # nginx's client id of the publisher accepted on each key: only its publish_done
        # ends the key's stream (nginx also sends one for a publisher it refused)
        self._publishers: dict[str, str] = {}
        self._publishers_lock = threading.Lock()
        self._lock = threading.Lock()  # stream starts, one at a time
        self._halt = threading.Event()
        self._refresher: threading.Thread | None = None

    def url(self, http_port: int) -> str:
        """The hook URL for nginx (``on_publish``, ``on_publish_done``), secret included."""
        return f"http://{LOOPBACK}:{http_port}/hooks/rtmp/{self.secret}"

    def add_routes(self, app: FastAPI) -> None:
        # nginx's hook; the secret path segment is its credential (see __init__). Without
        # it, the plain path still answers: 403.
        hook = ["GET", "POST"]  # GET from nginx (notify_method get), POST as it used to be
        app.add_api_route("/hooks/rtmp/{secret}", self._rtmp_hook, methods=hook)
        app.add_api_route("/hooks/rtmp", self._rtmp_hook, methods=hook)

    def add_cluster_route(self, app: FastAPI, guard: list[Any]) -> None:
        """``GET /api/cluster`` (a cluster's ingest only)."""
        app.add_api_route("/api/cluster", self._cluster, methods=["GET"], dependencies=guard)

    def has_publisher(self, key: str) -> bool:
        with self._publishers_lock:
            return key in self._publishers

    def start_refresher(self) -> None:
        """On a cluster's ingest: keep the published keys announced (``_refresh_published``)."""
        self._refresher = threading.Thread(
            target=self._refresh_published, name="published-keys", daemon=True
        )
        self._refresher.start()

    def stop_refresher(self) -> None:
        self._halt.set()
        if self._refresher is not None:
            self._refresher.join(5)

    async def _rtmp_hook(self, request: Request) -> Any:
        # Only the nginx this service started knows the secret in its hook URL: anyone
        # else, loopback or not, gets 403 and changes nothing.
        given = request.path_params.get("secret", "")
        if (
            request.client is None
            or request.client.host != LOOPBACK
            or not hmac.compare_digest(given.encode(), self.secret.encode())
        ):
            raise HTTPException(403, "hooks are for the ingest server this service started")
        # nginx sends its own fields first and the client's URL arguments after them, so
        # the first value of a field is nginx's: a client cannot override call or name.
        fields = request.url.query if request.method == "GET" else (await request.body()).decode()
        form = {k: v[0] for k, v in parse_qs(fields).items()}
        call, app, key = form.get("call", ""), form.get("app", ""), form.get("name", "")
        if app == "live" and call == "publish":
            self._publish(key, form.get("clientid", ""))
        elif app == "live" and call == "publish_done":
            self._publish_done(key, form.get("clientid", ""))
        return PlainTextResponse("ok")

    def _publish(self, key: str, client: str) -> None:
        """nginx asks whether ``client`` may publish ``key``: HTTPException if not."""
        if key not in self.profiles:
            log.warning("refused a publisher on unknown stream key %r", key)
            raise HTTPException(403, f"unknown stream key {key!r}")
        with self._publishers_lock:
            if key in self._publishers:
                # nginx would refuse it too ("already publishing"), but only after this
                # answer, and then send a publish_done for it. Refused here, it gets none.
                log.warning("refused a second publisher on stream key %r", key)
                raise HTTPException(409, f"stream key {key!r} already has a publisher")
            self._publishers[key] = client
        if self.store is not None:
            self._announce(key, client)
            return
        # the profile as it is now, read here on the loop where the API changes it
        args = (key, client, self.settings_for(key), self.profiles[key].source.name)
        threading.Thread(target=self._start_stream, args=args, daemon=True).start()

    def _publish_done(self, key: str, client: str) -> None:
        """A publisher left ``key``: the stream stops if it was the one accepted there."""
        with self._publishers_lock:
            if self._publishers.get(key) != client:
                log.info("stream %s: publish_done of client %s, not its publisher", key, client)
                return
            del self._publishers[key]
        if self.store is not None:
            with contextlib.suppress(StoreError):  # else its entry runs out by itself
                self.store.unpublish(key, client)
            return
        # Released here, on the loop, before any later publish on the key is answered: so
        # that publish sees a stream winding down and starts a new one.
        with contextlib.suppress(UnknownStreamError):
            self.manager.release(key)

    def ingest_exited(self, reason: str) -> None:
        """nginx died (the supervisor restarts it): every publisher was cut, and nginx sends
        no publish_done for them. Their streams end as if it had; a publisher that comes
        back publishes again and gets a new pipeline."""
        with self._publishers_lock:
            cut = sorted(self._publishers)
            gone = dict(self._publishers)
            self._publishers.clear()
        if self.store is not None:
            for key, client in gone.items():
                with contextlib.suppress(StoreError):
                    self.store.unpublish(key, client)
        for handle in self.manager.handles():
            if handle.running:
                with contextlib.suppress(UnknownStreamError):
                    self.manager.release(handle.key)
        log.warning("ingest server down (%s): publishers cut on %s", reason, cut or "no key")

    def _start_stream(
        self, key: str, client: str, settings: StreamSettings, source_name: str
    ) -> None:
        with self._lock:
            try:
                handle = self.manager.get(key)
            except UnknownStreamError:
                handle = None
            if handle is not None and handle.running:
                if not handle.released:
                    return  # a publisher back quickly: the running input reconnects by itself
                if handle.thread is not None:
                    handle.thread.join(15)  # the last publisher's stream is still flushing
            if self._publishers.get(key) != client:
                return  # this publisher left already
            try:
                self.manager.start(key, settings, source_name=source_name)
            except FacecastError as exc:
                log.error("stream %s: cannot start: %s", key, exc)
                return
            if self._publishers.get(key) != client:
                # it left while its pipeline was built, and its publish_done found nothing
                # to release yet
                self.manager.release(key)

    # ------------------------------------------------------------------ cluster (ingest role)

    def _announce(self, key: str, client: str) -> None:
        """Tell the workers ``key`` is published. A store that cannot hear it refuses the
        publisher (503): no worker would ever take the key."""
        assert self.store is not None
        try:
            self.store.refresh_published({key: client}, PUBLISHED_TTL_S)
        except StoreError as exc:
            with self._publishers_lock:
                if self._publishers.get(key) == client:
                    del self._publishers[key]
            log.error("refused a publisher on %r: %s", key, exc)
            raise HTTPException(503, f"no worker can be told about {key!r}: {exc}") from None

    def _refresh_published(self) -> None:
        """Every second, every key still published, for PUBLISHED_TTL_S more: the store
        forgets the keys of an ingest that died, and learns them again after a restart."""
        assert self.store is not None
        failing = False
        while not self._halt.wait(PUBLISHED_REFRESH_S):
            with self._publishers_lock:
                publishers = dict(self._publishers)
            try:
                self.store.refresh_published(publishers, PUBLISHED_TTL_S)
            except StoreError as exc:
                if not failing:
                    log.warning("cannot refresh the published keys (retrying): %s", exc)
                failing = True
                continue
            if failing:
                log.info("store reachable again: %d published key(s) refreshed", len(publishers))
            failing = False

    async def _cluster(self) -> dict[str, Any]:
        """Which keys are published, which worker runs each, and the workers alive."""
        assert self.store is not None
        try:
            return await run_in_threadpool(cluster_view, self.store)
        except StoreError as exc:
            raise HTTPException(503, str(exc)) from None
