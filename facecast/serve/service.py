"""``facecast serve``: the ingest server, the HTTP plane and one pipeline per stream key, put
together, started and stopped as one ``Service``.

A publisher pushes ``rtmp://HOST/live/KEY``; a key with a profile is accepted and its
pipeline reads ``live/KEY`` and publishes ``swapped/KEY`` with the profile's face
(``facecast.serve.publish_hooks``). WHIP publishers and WHEP viewers reach the same keys
(``facecast.serve.webrtc_routes``). Everything lives on the ``Service`` object: several can
run in one process (the tests do).

A profile may name references (reference mode): then only the people in those photos are
swapped, each with the profile's face or a face of their own, and everyone else is left as
they are. Profiles and their references change through the HTTP API, and with a state
folder (``state_dir``) the changes outlive a restart (``facecast.serve.profile_routes``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
from pathlib import Path
from typing import Unpack

from fastapi import HTTPException, Request

from facecast.config import StreamSettings
from facecast.live.pipeline import engine_options
from facecast.safety.consent import check_profiles, consent_routes
from facecast.safety.moderation import GateOptions, GateSettings, build_gate
from facecast.serve.app import LOOPBACK, bearer_guard, bind_host, create_app
from facecast.serve.http_server import Runnable, ThreadedServer
from facecast.serve.ingest import IngestAccess, IngestServer
from facecast.serve.metrics import ClusterCollector, IngestCollector
from facecast.serve.profile_routes import ProfileRoutes
from facecast.serve.profiles import Profile, load_profiles, stream_settings
from facecast.serve.publish_hooks import PublishHooks
from facecast.serve.store import ClusterStore, profile_entry, store_problems
from facecast.serve.streams import DEFAULT_RETENTION, StreamManager
from facecast.serve.uploads import MAX_UPLOAD_BYTES
from facecast.serve.web import mount_web
from facecast.serve.webrtc_routes import WebrtcRoutes
from facecast.webrtc.page import WebSessions

log = logging.getLogger(__name__)

# Hosts that mean "this machine only": viewer auth is off by default there.
LOOPBACK_HOSTS = (LOOPBACK, "localhost", "::1")


def _play_secret(token: str | None) -> str:
    """What viewers' play tokens are signed with. Derived from the API token, so a key's
    token, and the URLs handed out, outlive a restart (and say nothing about the API token);
    without one, random per run."""
    if token is None:
        return secrets.token_urlsafe(32)
    return hmac.new(token.encode(), b"facecast viewer play tokens", hashlib.sha256).hexdigest()


# load_profiles: serve's and tests' import; stream_settings: as before it moved to profiles
__all__ = ["Profile", "Service", "load_profiles", "stream_settings"]


class Service(Runnable):
    """One ``facecast serve`` (or a cluster's ingest): its streams, its nginx, its HTTP plane
    and the routes on it, started and stopped together."""

    def __init__(
        self,
        profiles: dict[str, Profile],
        *,
        token: str | None,
        host: str = LOOPBACK,
        http_port: int = 8080,
        rtmp_port: int = 1935,
        hls_port: int = 8088,
        prefix: Path | None = None,
        base: StreamSettings | None = None,
        max_upload: int = MAX_UPLOAD_BYTES,
        state_dir: Path | None = None,
        retention: float = DEFAULT_RETENTION,
        viewer_auth: bool | None = None,
        store: ClusterStore | None = None,
        advertise: str | None = None,
        **gate: Unpack[GateOptions],
    ) -> None:
        """Nothing starts until ``start()``: ``app`` can be driven on its own (tests do).
        ``profiles``: from the ``--profiles`` file; ``state_dir``: where the API's changes
        are kept across restarts, laid over ``profiles`` here (None: not kept);
        ``retention``: seconds an ended stream stays listed; ``viewer_auth``: viewers of
        ``swapped/KEY`` and its HLS need the key's play token (``GET /api/play/KEY``);
        None: on unless the service listens on loopback only.

        ``store`` makes this the ingest of a cluster (``serve --role ingest``): published
        keys go to the store for workers to take instead of to pipelines here, profiles
        live in the store (``state_dir`` is not used), and ``advertise`` is the host name
        workers reach this ingest's RTMP port at.

        Face changes (``facecast.safety.moderation``, ``GateSettings``): ``require_consent``:
        every source face, the profiles' at start included, must match a person in the
        consent registry (kept with the state: ``state_dir``, or the store);
        ``moderation_url``: the webhook that allows or denies each new face, within
        ``moderation_timeout`` seconds; ``audit_log``: the JSON lines file of every attempt
        (None: ``audit.log`` in ``state_dir``, or none without one)."""
        self.max_upload = max_upload
        self.store = store
        self.base = base or StreamSettings()
        self.manager = StreamManager(retention)
        self.profile_routes = ProfileRoutes(
            profiles, state_dir=state_dir, store=store, manager=self.manager, max_upload=max_upload
        )
        self.profiles = self.profile_routes.profiles  # one dict: the API changes it in place
        self._uploads = self.profile_routes.uploads
        self.gate = build_gate(
            GateSettings(**gate),
            token=token,
            state_dir=state_dir if store is None else None,
            store=store,
        )
        if self.gate.require_consent:  # before anything starts: a face nobody agreed to
            assert self.gate.registry is not None
            check_profiles(self.gate.registry, self.profiles)
        self.host = bind_host(host, token)
        self.http_port = http_port
        if viewer_auth is None:
            viewer_auth = self.host not in LOOPBACK_HOSTS
        self.viewer_auth = viewer_auth
        self.hooks = PublishHooks(self.profiles, self.manager, store, self.settings_for)
        self._hook_secret = self.hooks.secret
        # The ingest server opens to other hosts exactly when the HTTP plane does. The
        # workers' secret, per run, known only to this process and the nginx it starts: in
        # the query string of the URLs facecast's own reader plays and its own output
        # publishes, and nginx checks it, so nobody else, loopback included, plays the raw
        # live/KEY or publishes into swapped/KEY.
        access = IngestAccess(
            listen=self.host,
            worker_secret=secrets.token_urlsafe(32),
            play_secret=_play_secret(token) if viewer_auth else None,
            remote_workers=store is not None,
        )
        self.ingest = IngestServer(
            rtmp_port,
            hls_port,
            prefix,
            on_publish_url=self.hooks.url(http_port),
            access=access,
            supervise=True,
            on_exit=self.hooks.ingest_exited,
        )
        self.advertise = advertise or socket.gethostname()
        self._ingest_started = False
        self.manager.checks.append(self._ingest_problems)
        self.manager.collectors.append(IngestCollector(self.ingest))
        if store is not None:
            self.manager.checks.append(lambda: store_problems(store))
            self.manager.collectors.append(ClusterCollector(store))
        self.app = create_app(
            self.manager,
            token,
            max_upload,
            on_source=self.profile_routes.source_changed,
            gate=self.gate,
        )
        # the browser page (/web/, /api/web/): WebRTC sessions with this service's models
        self.web = WebSessions(engine_options(self.base))
        self.webrtc = WebrtcRoutes(self.hooks, self.ingest, token, viewer_auth)
        self.whip, self.whep = self.webrtc.whip, self.webrtc.whep
        self.webrtc.add_routes(self.app)  # before /web is mounted: /web/watch/KEY is a route
        mount_web(self.app, self.web, token, max_upload, gate=self.gate)
        guard = bearer_guard(token)
        self.hooks.add_routes(self.app)
        self.app.add_api_route(
            "/api/play/{key}", self._play_urls, methods=["GET"], dependencies=guard
        )
        self.profile_routes.add_routes(self.app, guard, self.gate)
        if self.gate.registry is not None:  # GET/POST /api/consent, DELETE /api/consent/NAME
            consent_routes(self.app, self.gate.registry, self.gate, token, max_upload)
        if store is not None:
            self.hooks.add_cluster_route(self.app, guard)
        self._http: ThreadedServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Service:
        if self.store is not None:
            # the workers' view first: which profiles, and where to read and publish
            self.store.set_profiles(
                {k: profile_entry(self.store, p) for k, p in self.profiles.items()}
            )
            self.store.advertise_ingest(
                f"rtmp://{self.advertise}:{self.ingest.rtmp_port}",
                self.ingest.access.worker_secret or "",
            )
        self._http = ThreadedServer(self.app, self.host, self.http_port)
        self._http.start()
        self.ingest.start()
        self._ingest_started = True
        if self.store is not None:
            self.hooks.start_refresher()
        log.info(
            "serving %d profile(s): publish to %s, watch %s; HTTP on %s:%d",
            len(self.profiles),
            self.ingest.rtmp_url("live", "KEY"),
            self.ingest.rtmp_url("swapped", "KEY"),
            self.host,
            self.http_port,
        )
        return self

    def _ingest_problems(self) -> list[str]:
        """Readiness of the ingest server: the HTTP plane answers first (nginx's publish hooks
        need it), so until nginx has started too, /readyz must not say ready."""
        if not self._ingest_started:
            return ["ingest server not started yet"]
        return self.ingest.problems()

    def stop(self) -> None:
        """Stop every stream (each flushes its output), then nginx, then the HTTP plane."""
        self.hooks.stop_refresher()
        self.webrtc.close()
        self.manager.stop_all()
        self.web.close_all_blocking()  # on the HTTP loop, so before the HTTP plane stops
        self.ingest.stop()
        if self._http is not None:
            self._http.stop()
        self.profile_routes.discard_uploads()

    # ------------------------------------------------------------------ streams

    async def _play_urls(self, key: str, request: Request) -> dict[str, str]:
        """Where viewers watch ``key``: RTMP and HLS, with its play token when viewer auth
        is on. The host is the one this request came to (the same machine serves both)."""
        if key not in self.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        host = request.url.hostname or LOOPBACK
        return self.play_urls(key, f"[{host}]" if ":" in host else host)

    def play_urls(self, key: str, host: str = LOOPBACK) -> dict[str, str]:
        """``{"rtmp": ..., "hls": ...}``: where viewers watch ``key``'s swapped output."""
        return self.ingest.play_urls(key, host)

    def settings_for(self, key: str) -> StreamSettings:
        # with this run's worker secret: nginx lets only these read and publish
        return stream_settings(
            self.base,
            self.profiles[key],
            self.ingest.worker_url("live", key),
            self.ingest.worker_url("swapped", key),
        )
