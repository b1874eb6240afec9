"""``facecast serve``: the ingest server, the HTTP plane and one pipeline per stream key.

A publisher pushes ``rtmp://HOST/live/KEY``. nginx asks the HTTP plane (``on_publish``)
whether KEY may publish; a key with a profile is accepted and its pipeline starts, reading
``live/KEY`` and publishing ``swapped/KEY`` with the profile's face. When the publisher
stops (``on_publish_done``) the pipeline stops; the stream stays listed as ended (status,
metrics) for the manager's retention, and a new publish on the key replaces it. Everything
lives on the ``Service`` object: several can run in one process (the tests do).

A profile may name references (reference mode): then only the people in those photos are
swapped, each with the profile's face or a face of their own, and everyone else is left as
they are. Profiles and their references change through the HTTP API (``PUT``/``DELETE
/api/profiles/KEY``, ``POST``/``DELETE /api/profiles/KEY/references``); a change takes
effect at the key's next publish. A face changed on a running stream (``POST
/api/streams/KEY/source``) becomes the key's profile face too, so a publisher that
reconnects keeps it. Deleting a profile leaves a running stream on the key running until
its publisher stops; the key is refused from its next publish.

With a state folder (``state_dir``), every such change is saved there and laid over the
``--profiles`` file at the next start (see ``facecast.serve.profiles``). Without one, changes
last until the process stops and uploads go to a temporary folder.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import shutil
import socket
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.select import Selection
from facecast.live.pipeline import engine_options
from facecast.safety.consent import check_profiles, consent_routes
from facecast.safety.moderation import DEFAULT_TIMEOUT, audited, build_gate, vet
from facecast.serve.app import (
    LOOPBACK,
    MAX_UPLOAD_BYTES,
    ThreadedServer,
    bearer_guard,
    bind_host,
    create_app,
    decode_off_loop,
    is_multipart,
    read_form,
    read_image_upload,
    read_limited,
)
from facecast.serve.ingest import IngestServer
from facecast.serve.metrics import ClusterCollector, IngestCollector
from facecast.serve.profiles import (
    BLENDS,
    KEY_RE,
    Profile,
    ProfileState,
    load_profiles,
    store_image,
    store_images,
)
from facecast.serve.store import (
    ClusterStore,
    StoreError,
    StoreProfileState,
    cluster_view,
    profile_entry,
    store_problems,
)
from facecast.serve.streams import DEFAULT_RETENTION, StreamManager, UnknownStreamError
from facecast.serve.web import mount_web
from facecast.webrtc.page import BadOfferError, NegotiationTimeout, WebSessions
from facecast.webrtc.whip import (
    BusyKeyError,
    RtmpRelay,
    WhepEgress,
    WhipIngest,
    accept_post,
    no_trickle,
    read_offer,
    sdp_created,
)
from facecast.webrtc.whip import UnknownSessionError as WebrtcSessionError

log = logging.getLogger(__name__)

# Hosts that mean "this machine only": viewer auth is off by default there.
LOOPBACK_HOSTS = (LOOPBACK, "localhost", "::1")
# A cluster's ingest tells the store every PUBLISHED_REFRESH_S which keys are published,
# each good for PUBLISHED_TTL_S: the keys of an ingest that died are gone that much later.
PUBLISHED_REFRESH_S, PUBLISHED_TTL_S = 1.0, 5.0


def _play_secret(token: str | None) -> str:
    """What viewers' play tokens are signed with. Derived from the API token, so a key's
    token, and the URLs handed out, outlive a restart (and say nothing about the API token);
    without one, random per run."""
    if token is None:
        return secrets.token_urlsafe(32)
    return hmac.new(token.encode(), b"facecast viewer play tokens", hashlib.sha256).hexdigest()


__all__ = ["Profile", "Service", "load_profiles"]  # load_profiles: serve's and tests' import


class Service:
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
        require_consent: bool = False,
        moderation_url: str | None = None,
        moderation_timeout: float = DEFAULT_TIMEOUT,
        audit_log: Path | None = None,
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

        Face changes (``facecast.safety.moderation``): ``require_consent``: every source face, the
        profiles' at start included, must match a person in the consent registry (kept
        with the state: ``state_dir``, or the store); ``moderation_url``: the webhook that
        allows or denies each new face, within ``moderation_timeout`` seconds;
        ``audit_log``: the JSON lines file of every attempt (None: ``audit.log`` in
        ``state_dir``, or none without one)."""
        self.max_upload = max_upload
        self.store = store
        self.base = base or StreamSettings()
        self.manager = StreamManager(retention)
        self._load_profiles(profiles, state_dir, store)
        self.gate = build_gate(
            token=token,
            state_dir=state_dir if store is None else None,
            store=store,
            require_consent=require_consent,
            moderation_url=moderation_url,
            moderation_timeout=moderation_timeout,
            audit_log=audit_log,
        )
        if require_consent:  # before anything starts: a profile's face nobody agreed to
            assert self.gate.registry is not None
            check_profiles(self.gate.registry, self.profiles)
        self.host = bind_host(host, token)
        self.http_port = http_port
        # Per-run secrets, known only to this process and the nginx it starts (its config
        # is mode 0600). The hook URL's: only that nginx can start or stop streams. The
        # workers': in the query string of the URLs facecast's own reader plays and its
        # own output publishes, and nginx checks it, so nobody else, loopback included,
        # plays the raw live/KEY or publishes into swapped/KEY.
        self._hook_secret = secrets.token_urlsafe(32)
        if viewer_auth is None:
            viewer_auth = self.host not in LOOPBACK_HOSTS
        self.viewer_auth = viewer_auth
        hook = f"http://{LOOPBACK}:{http_port}/hooks/rtmp/{self._hook_secret}"
        # The ingest server opens to other hosts exactly when the HTTP plane does.
        self.ingest = IngestServer(
            rtmp_port,
            hls_port,
            prefix,
            on_publish_url=hook,
            listen=self.host,
            worker_secret=secrets.token_urlsafe(32),
            play_secret=_play_secret(token) if viewer_auth else None,
            supervise=True,
            on_exit=self._ingest_exited,
            remote_workers=store is not None,
        )
        self.advertise = advertise or socket.gethostname()
        self._refresher: threading.Thread | None = None
        self._halt = threading.Event()
        # nginx's client id of the publisher accepted on each key: only its publish_done
        # ends the key's stream (nginx also sends one for a publisher it refused)
        self._publishers: dict[str, str] = {}
        self._publishers_lock = threading.Lock()
        self._ingest_started = False
        self.manager.checks.append(self._ingest_problems)
        self.manager.collectors.append(IngestCollector(self.ingest))
        if store is not None:
            self.manager.checks.append(lambda: store_problems(store))
            self.manager.collectors.append(ClusterCollector(store))
        self.app = create_app(
            self.manager, token, max_upload, on_source=self._source_changed, gate=self.gate
        )
        # the browser page (/web/, /api/web/): WebRTC sessions with this service's models
        self.web = WebSessions(engine_options(self.base))
        # WHIP in (relayed to live/KEY on our own ingest), WHEP out (swapped/KEY as it is)
        self.whip = WhipIngest(RtmpRelay(lambda key: self.ingest.rtmp_url("live", key)), audio=True)
        self.whep = WhepEgress(lambda key: self.play_urls(key)["rtmp"])
        self._add_webrtc_routes(token)  # before /web is mounted: /web/watch/KEY is a route
        mount_web(self.app, self.web, token, max_upload, gate=self.gate)
        self._add_routes(token)
        if self.gate.registry is not None:  # GET/POST /api/consent, DELETE /api/consent/NAME
            consent_routes(self.app, self.gate.registry, self.gate, token, max_upload)
        if store is not None:
            self.app.add_api_route(
                "/api/cluster", self._cluster, methods=["GET"], dependencies=bearer_guard(token)
            )
        self._http: ThreadedServer | None = None
        self._lock = threading.Lock()

    def _load_profiles(
        self, from_file: dict[str, Profile], state_dir: Path | None, store: ClusterStore | None
    ) -> None:
        """The profiles in force: the file's, with the state's changes laid over them."""
        self._file_keys = set(from_file)
        self._state: ProfileState | StoreProfileState | None = None
        if store is not None:
            self._state = StoreProfileState(
                store, Path(tempfile.mkdtemp(prefix="facecast-ingest-"))
            )
        elif state_dir is not None:
            self._state = ProfileState(state_dir)
        # Faces uploaded through the API: a private folder, files named by us, never by
        # the request; kept with the state, else temporary.
        if self._state is not None:
            self._uploads = self._state.faces
            self._changed, self._deleted = self._state.load()
            self._state.prune_faces(self._changed)
        else:
            self._uploads = Path(tempfile.mkdtemp(prefix="facecast-faces-"))
            self._changed, self._deleted = {}, set()
        self.profiles = {k: p for k, p in from_file.items() if k not in self._deleted}
        self.profiles.update(self._changed)
        if self._changed or self._deleted:
            log.info(
                "state %s: %d profile(s) set and %d deleted through the API",
                state_dir,
                len(self._changed),
                len(self._deleted),
            )

    def _add_routes(self, token: str | None) -> None:
        guard = bearer_guard(token)
        # nginx's hook; the secret path segment is its credential (see __init__). Without
        # it, the plain path still answers: 403.
        hook = ["GET", "POST"]  # GET from nginx (notify_method get), POST as it used to be
        self.app.add_api_route("/hooks/rtmp/{secret}", self._rtmp_hook, methods=hook)
        self.app.add_api_route("/hooks/rtmp", self._rtmp_hook, methods=hook)
        self.app.add_api_route(
            "/api/play/{key}", self._play_urls, methods=["GET"], dependencies=guard
        )
        # the keys are what a publisher needs: listed to the token holder only
        self.app.add_api_route(
            "/api/profiles", self._list_profiles, methods=["GET"], dependencies=guard
        )
        self.app.add_api_route(
            "/api/profiles/{key}", self._put_profile, methods=["PUT"], dependencies=guard
        )
        self.app.add_api_route(
            "/api/profiles/{key}", self._delete_profile, methods=["DELETE"], dependencies=guard
        )
        self.app.add_api_route(
            "/api/profiles/{key}/references",
            self._add_reference,
            methods=["POST"],
            dependencies=guard,
            openapi_extra={"requestBody": REFERENCE_BODY},
        )
        self.app.add_api_route(
            "/api/profiles/{key}/references",
            self._clear_references,
            methods=["DELETE"],
            dependencies=guard,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Service:
        if self.store is not None:
            # the workers' view first: which profiles, and where to read and publish
            self.store.set_profiles(
                {k: profile_entry(self.store, p) for k, p in self.profiles.items()}
            )
            self.store.advertise_ingest(
                f"rtmp://{self.advertise}:{self.ingest.rtmp_port}", self.ingest.worker_secret or ""
            )
        self._http = ThreadedServer(self.app, self.host, self.http_port)
        self._http.start()
        self.ingest.start()
        self._ingest_started = True
        if self.store is not None:
            self._refresher = threading.Thread(
                target=self._refresh_published, name="published-keys", daemon=True
            )
            self._refresher.start()
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
        self._halt.set()
        if self._refresher is not None:
            self._refresher.join(5)
        self._close_webrtc()
        self.manager.stop_all()
        self.web.close_all_blocking()  # on the HTTP loop, so before the HTTP plane stops
        self.ingest.stop()
        if self._http is not None:
            self._http.stop()
        if self._state is None:  # with a state folder, the uploads are part of the state
            shutil.rmtree(self._uploads, ignore_errors=True)

    # ------------------------------------------------------------------ profiles API

    # Handlers that read or change ``profiles`` run on the event loop (coroutines, and the
    # stream-source hook, which server.py calls there), one at a time between awaits, so a
    # change is never seen half made. Each reads the profile again after its last await.

    async def _list_profiles(self) -> dict[str, Any]:
        return {
            key: {
                "source": p.source.name,
                "faces": p.faces,
                "blend": p.blend,
                "references": _reference_names(p),
                **dict(p.models),
            }
            for key, p in sorted(self.profiles.items())
        }

    @audited("profile_set")  # consent, moderation and the audit log: see self.gate
    async def _put_profile(
        self, key: str, request: Request, faces: str = "all", blend: str = "feather"
    ) -> dict[str, Any]:
        """A profile for ``key`` from an uploaded face photo (the body, or the multipart
        part ``file``); options as query parameters. A key's references are kept. Takes
        effect at the key's next publish."""
        if not KEY_RE.fullmatch(key):
            raise HTTPException(422, "stream key: 1-64 letters, digits, '-' or '_'")
        try:
            Selection.parse(faces)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if blend not in BLENDS:
            raise HTTPException(422, f"blend must be one of {', '.join(BLENDS)}")
        name = f"face for {key}"
        image = await read_image_upload(request, self.max_upload, name)
        await run_in_threadpool(_require_face, image, name)
        await vet(request, [("source", image)])  # 403 when refused: nothing changes
        path = self._store(image)
        old = self.profiles.get(key)
        kept = (old.references, old.models) if old else ((), ())
        self._commit(key, Profile(path, faces, blend, *kept))
        log.info("profile %s: set through the API", key)
        return {"key": key, "faces": faces, "blend": blend}

    async def _delete_profile(self, key: str) -> dict[str, Any]:
        """Remove ``key``'s profile: its publishers are refused from now on. A stream
        already running on the key runs on, with the faces it loaded, until its publisher
        stops (cutting a live audience off is the publisher's call, not a side effect)."""
        if key not in self.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        self._commit(key, None)
        try:
            running = self.manager.get(key).running
        except UnknownStreamError:
            running = False
        log.info("profile %s: deleted through the API", key)
        return {"key": key, "deleted": True, "stream_running": running}

    @audited("reference")
    async def _add_reference(self, key: str, request: Request) -> dict[str, Any]:
        """One more person for ``key``'s profile to swap (reference mode): the body is
        ``{"photo": BASE64, "face": BASE64}``, or multipart parts ``photo`` and ``face``;
        ``face`` optional (then the profile's face). Takes effect at the key's next
        publish."""
        if key not in self.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        images = await self._reference_upload(request, key)
        for what, image in images.items():
            await run_in_threadpool(_require_face, image, f"reference {what} for {key}")
        # the face put on the person needs consent; the photo of who is swapped does not
        face_part = [("face", images["face"])] if "face" in images else []
        await vet(request, face_part, [("photo", images["photo"])])
        profile = self.profiles.get(key)  # again: it may have been deleted meanwhile
        if profile is None:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        photo = self._store(images["photo"])
        face = self._store(images["face"]) if "face" in images else None
        profile = replace(profile, references=(*profile.references, (photo, face)))
        self._commit(key, profile)
        log.info("profile %s: reference %d added through the API", key, len(profile.references))
        return {"key": key, "references": _reference_names(profile)}

    async def _reference_upload(self, request: Request, key: str) -> dict[str, np.ndarray]:
        """``photo`` and maybe ``face``, from multipart parts or a JSON body, decoded."""
        if is_multipart(request):
            parts = await read_form(request, self.max_upload, REFERENCE_FIELDS, ("photo",))
            uploads = {what: datas[0] for what, datas in parts.items()}
        else:
            # two images, each at most max_upload once decoded: base64 is 4/3 of that, plus
            # room for line breaks and the JSON around them
            body = await read_limited(request, 3 * self.max_upload)
            # up to 30 MB of JSON and base64 to undo: not on the loop either
            uploads = await run_in_threadpool(_reference_uploads, body, self.max_upload)
        # in the order given, photo first: the first bad one is the one reported
        return {
            what: await decode_off_loop(request, data, f"reference {what} for {key}")
            for what, data in uploads.items()
        }

    async def _clear_references(self, key: str) -> dict[str, Any]:
        """Back to swapping by ``faces`` for ``key``, from its next publish. The stored files
        stay until the service starts again: a stream starting now may still be reading
        them."""
        profile = self.profiles.get(key)
        if profile is None:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        self._commit(key, replace(profile, references=()))
        log.info("profile %s: references cleared through the API", key)
        return {"key": key, "references": []}

    def _source_changed(self, key: str, images: list[np.ndarray], name: str) -> bool:
        """A running stream took a new face through the API: it becomes the key's profile
        face, so a publisher that reconnects (a new pipeline) keeps it. False when the key
        has no profile any more (deleted while the stream ran): nothing to keep it in."""
        profile = self.profiles.get(key)
        if profile is None:
            return False
        try:
            source = self._store(images[0]) if len(images) == 1 else self._store_all(images)
            self._commit(key, replace(profile, source=source))
        except HTTPException as exc:
            raise HTTPException(
                exc.status_code,
                f"the stream has the new face, but it is not kept for the key's next "
                f"publish: {exc.detail}",
            ) from None
        log.info("profile %s: face from %s, kept for the next publish", key, name)
        return True

    def _commit(self, key: str, profile: Profile | None) -> None:
        """Set ``key``'s profile (None: delete it), saved to the state folder first: if
        that fails (507), nothing changes, so memory is never ahead of the disk."""
        changed, deleted = dict(self._changed), set(self._deleted)
        if profile is None:
            changed.pop(key, None)
            if key in self._file_keys:  # else it would come back from the file at start
                deleted.add(key)
        else:
            changed[key] = profile
            deleted.discard(key)
        if self._state is not None:
            try:
                self._state.save(changed, deleted)
                if self.store is not None:  # the workers' copy of the profile in force
                    entry = profile_entry(self.store, profile) if profile else None
                    self.store.set_profile(key, entry)
            except OSError as exc:
                raise HTTPException(507, f"cannot save the profiles' state: {exc}") from None
            except StoreError as exc:
                raise HTTPException(503, str(exc)) from None
        self._changed, self._deleted = changed, deleted
        if profile is None:
            del self.profiles[key]
        else:
            self.profiles[key] = profile

    def _store(self, image: np.ndarray) -> Path:
        """An uploaded image as a PNG in the private uploads folder, named by us."""
        try:
            return store_image(self._uploads, image)
        except OSError as exc:
            raise HTTPException(507, f"cannot store the uploaded image: {exc}") from None

    def _store_all(self, images: list[np.ndarray]) -> Path:
        """Several photos of one person as a folder of PNGs in the uploads folder (a profile
        source may be a folder), named by us."""
        try:
            return store_images(self._uploads, images)
        except OSError as exc:
            raise HTTPException(507, f"cannot store the uploaded images: {exc}") from None

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    # ------------------------------------------------------------------ publish hooks

    async def _rtmp_hook(self, request: Request) -> Any:
        # Only the nginx this service started knows the secret in its hook URL: anyone
        # else, loopback or not, gets 403 and changes nothing.
        given = request.path_params.get("secret", "")
        if (
            request.client is None
            or request.client.host != LOOPBACK
            or not hmac.compare_digest(given.encode(), self._hook_secret.encode())
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

    def _ingest_exited(self, reason: str) -> None:
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

    # ------------------------------------------------------------------ WHIP and WHEP

    def _add_webrtc_routes(self, token: str | None) -> None:
        self._token = token
        add = self.app.add_api_route
        add("/whip/{key}", self._whip_offer, methods=["POST"], status_code=201)
        add("/whip/{key}", accept_post, methods=["OPTIONS"], include_in_schema=False)
        add("/whip/{key}/{session}", self._whip_delete, methods=["DELETE"])
        add("/whip/{key}/{session}", no_trickle, methods=["PATCH"])
        add("/whep/{key}", self._whep_offer, methods=["POST"], status_code=201)
        add("/whep/{key}", accept_post, methods=["OPTIONS"], include_in_schema=False)
        add("/whep/{key}/{session}", self._whep_delete, methods=["DELETE"])
        add("/whep/{key}/{session}", no_trickle, methods=["PATCH"])
        add("/web/watch/{key}", self._watch_page, methods=["GET"], include_in_schema=False)

    def _bearer(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _require_token(self, request: Request) -> None:
        """WHIP's auth is the API token, as a bearer token (RFC 9725, section 4.5)."""
        given = self._bearer(request)
        if self._token and not (given and hmac.compare_digest(given, self._token)):
            raise HTTPException(401, "a WHIP publisher needs the API token as its bearer token")

    def _require_viewer(self, request: Request, key: str) -> None:
        """WHEP viewers: anyone when viewer auth is off (as for HLS); else the key's play
        token (or the API token) as the bearer token."""
        if not self.viewer_auth:
            return
        given = self._bearer(request) or ""
        allowed = [self.ingest.play_token(key), *([self._token] if self._token else [])]
        if not any(hmac.compare_digest(given, a) for a in allowed):
            raise HTTPException(401, f"watching {key!r} needs its play token (GET /api/play/KEY)")

    async def _sdp_offer(self, request: Request, key: str) -> str:
        if key not in self.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        return await read_offer(request)

    async def _whip_offer(self, key: str, request: Request) -> Response:
        """A WHIP publisher's offer for ``key``: 201, the answer and the session's URL."""
        self._require_token(request)
        offer = await self._sdp_offer(request, key)
        with self._publishers_lock:
            busy = key in self._publishers
        if busy:
            raise HTTPException(409, f"stream key {key!r} already has a publisher")
        try:
            session, answer = await self.whip.create(key, offer)
        except (BadOfferError, BusyKeyError) as exc:
            raise HTTPException(409 if isinstance(exc, BusyKeyError) else 400, str(exc)) from None
        except NegotiationTimeout as exc:
            raise HTTPException(503, str(exc)) from None
        return sdp_created(answer, f"/whip/{key}/{session}")

    async def _whep_offer(self, key: str, request: Request) -> Response:
        """A WHEP viewer's offer for ``key``'s swapped stream."""
        self._require_viewer(request, key)
        offer = await self._sdp_offer(request, key)
        try:
            session, answer = await self.whep.create(key, offer)
        except BadOfferError as exc:
            raise HTTPException(400, str(exc)) from None
        except (BusyKeyError, NegotiationTimeout) as exc:
            raise HTTPException(503, str(exc)) from None
        return sdp_created(answer, f"/whep/{key}/{session}")

    async def _whip_delete(self, key: str, session: str, request: Request) -> dict[str, Any]:
        self._require_token(request)
        try:
            await self.whip.close(session)
        except WebrtcSessionError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key, "session": session, "ended": True}

    async def _whep_delete(self, key: str, session: str, request: Request) -> dict[str, Any]:
        self._require_viewer(request, key)
        try:
            await self.whep.close(session)
        except WebrtcSessionError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key, "session": session, "ended": True}

    async def _watch_page(self, key: str) -> FileResponse:
        return FileResponse(WATCH_PAGE, media_type="text/html")

    def _close_webrtc(self) -> None:
        """Every WHIP and WHEP session, closed on the loop they live on (shutdown)."""
        for sessions in (self.whip, self.whep):
            loop = sessions.loop
            if loop is None or loop.is_closed() or not loop.is_running():
                continue
            future = asyncio.run_coroutine_threadsafe(sessions.close_all(), loop)
            with contextlib.suppress(Exception):  # a timeout: the threads are daemons
                future.result(10)

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


def stream_settings(
    base: StreamSettings, profile: Profile, input_url: str, output_url: str
) -> StreamSettings:
    """The settings of one key's stream: ``base`` with the profile's face and options."""
    return base.model_copy(
        update={
            "source_image": profile.source,
            "faces": profile.faces,
            "blend": profile.blend,
            "references": list(profile.references),
            **dict(profile.models),
            "input": input_url,
            "output": output_url,
            "realtime": False,
        }
    )


# ---------------------------------------------------------------------------- API helpers

WATCH_PAGE = Path(__file__).resolve().parent / "static" / "watch.html"


REFERENCE_FIELDS = ("photo", "face")


def _reference_schema(fmt: str, encoding: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["photo"],
        "additionalProperties": False,
        "properties": {
            "photo": {
                "type": "string",
                "format": fmt,
                "description": f"JPEG or PNG of the person to swap{encoding}",
            },
            "face": {
                "type": "string",
                "format": fmt,
                "description": f"JPEG or PNG of the face they get{encoding}; "
                "default: the profile's face",
            },
        },
    }


REFERENCE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _reference_schema("byte", ", base64")},
        "multipart/form-data": {"schema": _reference_schema("binary", "")},
    },
}
BODY_SHAPE = 'expected JSON {"photo": BASE64, "face": BASE64 (optional)}'


def _reference_uploads(body: bytes, limit: int) -> dict[str, bytes]:
    """``photo`` and, if given, ``face`` from a JSON reference body, still encoded; else the
    HTTP error (422 for the JSON or base64, 413 for an image over ``limit``)."""
    try:
        data = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        raise HTTPException(422, f"body: {BODY_SHAPE}") from None
    except RecursionError:  # the decoder recurses per level: [[[[...]]]] runs out of stack
        raise HTTPException(422, f"body: nested too deeply; {BODY_SHAPE}") from None
    if not isinstance(data, dict) or "photo" not in data:
        raise HTTPException(422, f"body: {BODY_SHAPE}")
    unknown = set(data) - {"photo", "face"}
    if unknown:
        raise HTTPException(422, f"body: unknown fields {', '.join(sorted(unknown))}")
    uploads = {}
    for what in ("photo", "face"):
        text = data.get(what)
        if text is None and what == "face":
            continue
        if not isinstance(text, str):
            raise HTTPException(422, f"{what}: expected a base64 string")
        uploads[what] = _unbase64(text, what, limit)
    return uploads


def _unbase64(text: str, what: str, limit: int) -> bytes:
    """Base64 (line breaks allowed, a ``data:...;base64,`` prefix too) to at most ``limit``
    bytes."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = "".join(text.split())
    too_big = HTTPException(413, f"{what}: image over {limit // (1024 * 1024)} MB")
    if len(text) > 4 * (limit // 3 + 1):
        raise too_big
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{what}: not valid base64") from None
    if len(data) > limit:
        raise too_big
    return data


def _require_face(image: np.ndarray, name: str) -> None:
    """422 unless ``image`` shows a face. Slow (a tiled detection): run off the event loop."""
    if not FaceAnalyser(tiles=True).analyse(image):
        raise HTTPException(422, f"{name}: no face found in the photo")


def _reference_names(profile: Profile) -> list[dict[str, str | None]]:
    """What the API shows of a profile's references: file names, never folders."""
    return [
        {"photo": photo.name, "face": face.name if face else None}
        for photo, face in profile.references
    ]
