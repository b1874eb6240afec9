"""`facecast serve` (the service, its roles) and `facecast web` (the browser page)."""

from __future__ import annotations

import threading
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from facecast.errors import FacecastError

if TYPE_CHECKING:
    from facecast.serve.store import ClusterStore

from facecast.cli.base import (
    app,
    fail,
    warn,
)
from facecast.cli.options import (
    AuditLogFlag,
    HostFlag,
    RequireConsentFlag,
    StateDirFlag,
    StoreFlag,
    env_option,
)


class Role(StrEnum):
    """What one ``facecast serve`` process does (see docs/deploy.md)."""

    all = "all"
    ingest = "ingest"
    worker = "worker"


# Streams a worker takes by default: `facecast bench capacity` on 2 cores (docs/benchmarks.md).
DEFAULT_CAPACITY = 2


@app.command()
def serve(
    profiles: Annotated[
        Path | None,
        env_option(
            "FACECAST_PROFILES",
            metavar="YAML",
            help="Stream key -> source face and options.",
        ),
    ] = None,
    host: HostFlag = "0.0.0.0",
    http_port: Annotated[int, typer.Option(metavar="PORT", help="HTTP control plane port.")] = 8080,
    rtmp_port: Annotated[int, typer.Option(metavar="PORT", help="RTMP ingest port.")] = 1935,
    hls_port: Annotated[
        int, typer.Option(metavar="PORT", help="HLS port of the ingest server.")
    ] = 8088,
    state_dir: StateDirFlag = None,
    viewer_auth: Annotated[
        bool | None,
        typer.Option(
            "--viewer-auth/--no-viewer-auth",
            help="Viewers of swapped/KEY and its HLS need the key's play token "
            "(GET /api/play/KEY) [default: on unless --host is loopback].",
        ),
    ] = None,
    role: Annotated[
        Role,
        env_option(
            "FACECAST_ROLE",
            help="all: one box does everything; ingest: nginx and the API, streams go to "
            "workers; worker: runs the streams the store assigns it.",
        ),
    ] = Role.all,
    store: StoreFlag = None,
    advertise: Annotated[
        str | None,
        env_option(
            "FACECAST_ADVERTISE",
            metavar="HOST",
            help="Ingest: the host name workers reach its RTMP port at [default: this "
            "machine's name].",
        ),
    ] = None,
    capacity: Annotated[
        int,
        env_option(
            "FACECAST_CAPACITY",
            metavar="N",
            min=1,
            help="Worker: the most streams it runs at once.",
        ),
    ] = DEFAULT_CAPACITY,
    require_consent: RequireConsentFlag = False,
    moderation_url: Annotated[
        str | None,
        env_option(
            "FACECAST_MODERATION_URL",
            metavar="URL",
            help="Webhook that allows or denies each new source face or reference; an "
            "error or no answer denies.",
        ),
    ] = None,
    moderation_timeout: Annotated[
        float,
        env_option(
            "FACECAST_MODERATION_TIMEOUT",
            metavar="SECONDS",
            min=0.1,
            help="How long the webhook has to answer.",
        ),
    ] = 5.0,
    audit_log: AuditLogFlag = None,
) -> None:
    """Service mode: ingest server, HTTP API and one pipeline per key.

    Every stream published to rtmp://HOST/live/KEY comes out swapped with KEY's profile at
    rtmp://HOST/swapped/KEY. The API token is read from FACECAST_API_TOKEN. With --role
    ingest and workers (--role worker) sharing a --store, the streams run on the workers.
    """
    import os

    from facecast.live.pipeline import _stop_on_signals
    from facecast.serve.profiles import resolve_state_dir
    from facecast.serve.service import Service, load_profiles

    token = os.environ.get("FACECAST_API_TOKEN") or None
    if role is not Role.all and not store:
        raise fail(f"--role {role.value} needs --store URL (a Redis URL)")
    try:
        stop = threading.Event()
        cluster_store = _open_store(store) if role is not Role.all else None
        # consent, moderation and the audit log: the same on every role that takes faces
        gate: dict[str, Any] = {
            "require_consent": require_consent,
            "moderation_url": moderation_url,
            "moderation_timeout": moderation_timeout,
            "audit_log": audit_log,
        }
        if role is Role.worker:
            from facecast.serve.worker import Worker

            assert cluster_store is not None
            worker = Worker(
                cluster_store,
                capacity=capacity,
                token=token,
                host=host,
                http_port=http_port,
                **gate,
            )
            with _stop_on_signals(stop):
                worker.run(stop)
            return
        table = load_profiles(profiles) if profiles else {}
        if not table and role is Role.all:
            warn("no profiles: every publisher will be refused")
        service = Service(
            table,
            token=token,
            host=host,
            http_port=http_port,
            rtmp_port=rtmp_port,
            hls_port=hls_port,
            state_dir=resolve_state_dir(state_dir) if cluster_store is None else None,
            viewer_auth=viewer_auth,
            store=cluster_store,
            advertise=advertise,
            **gate,
        )
        with _stop_on_signals(stop):
            service.run(stop)
    except FacecastError as exc:
        raise fail(str(exc)) from None


def _open_store(url: str | None) -> ClusterStore:
    """The cluster's store, checked to answer now: a wrong URL fails at start, not later."""
    from facecast.serve.store import ClusterStore

    store = ClusterStore(url or "")
    store.ping()
    return store


@app.command()
def web(
    host: HostFlag = "0.0.0.0",
    port: Annotated[int, typer.Option(metavar="PORT", help="HTTP port.")] = 8080,
    max_sessions: Annotated[
        int, typer.Option(metavar="N", help="Browser sessions open at once.")
    ] = 4,
) -> None:
    """The browser page alone: camera in, swapped video back.

    Serves http://HOST:PORT/web/ over WebRTC. The token is read from FACECAST_API_TOKEN.
    """
    import os

    from facecast.config import StreamSettings
    from facecast.live.pipeline import _stop_on_signals, engine_options
    from facecast.serve.web import WebServer
    from facecast.webrtc.page import WebSessions

    try:
        sessions = WebSessions(engine_options(StreamSettings()), limit=max_sessions)
        server = WebServer(
            sessions, token=os.environ.get("FACECAST_API_TOKEN") or None, host=host, port=port
        )
        stop = threading.Event()
        with _stop_on_signals(stop):
            server.run(stop)
    except FacecastError as exc:
        raise fail(str(exc)) from None
