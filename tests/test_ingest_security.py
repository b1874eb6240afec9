"""Who may publish, play and call hooks on `facecast serve`'s ingest server, for real.

Real nginx-rtmp (the config facecast renders), ffmpeg as publisher and as the stranger, real
HTTP requests against the service. The stranger sits on loopback, the worst case: address
rules alone cannot tell it from facecast's own reader and publisher.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from facecast.serve.ingest import free_ports
from facecast.serve.service import Service, load_profiles
from tests import live_helpers
from tests.conftest import MEDIA
from tests.live_helpers import probe, publish, stop_process, wait_for_stream, wait_until

live_procs = live_helpers.live_procs

CLIP = MEDIA / "short_hamilton_clip.mp4"
TOKEN = "security-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_service(tmp_path: Path, **options: Any) -> Service:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "profiles.yaml"
    path.write_text(
        f"alice:\n  source: {MEDIA / 'obama.jpg'}\n  faces: all\n"
        f"bob:\n  source: {MEDIA / 'biden.jpg'}\n  faces: all\n"
    )
    http_port, rtmp_port, hls_port = free_ports(3)
    return Service(
        load_profiles(path),
        token=options.pop("token", TOKEN),
        host=options.pop("host", "127.0.0.1"),
        http_port=http_port,
        rtmp_port=rtmp_port,
        hls_port=hls_port,
        prefix=tmp_path / "ingest",
        **options,
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = make_service(tmp_path).start()
    try:
        yield svc
    finally:
        svc.stop()


def api(svc: Service, path: str) -> str:
    return f"http://127.0.0.1:{svc.http_port}{path}"


def is_running(svc: Service, key: str) -> bool:
    reply = httpx.get(api(svc, f"/api/streams/{key}"), headers=AUTH, timeout=10)
    return reply.status_code == 200 and reply.json()["state"] == "running"


def refused(proc: Any, timeout: float = 15) -> bool:
    """The ffmpeg publisher was turned away: it exited, with an error, within ``timeout``."""
    return wait_until(lambda: proc.poll() is not None, timeout) and proc.returncode != 0


def start_alice(svc: Service, live_procs: Any, watch: str | None = None) -> Any:
    """Publish alice and wait until facecast's output of it plays at ``watch`` (default: the
    plain swapped URL): its worker read live/alice and published swapped/alice."""
    pub = live_procs.add(publish(svc.ingest.rtmp_url("live", "alice"), CLIP, loop=True))
    wait_for_stream(watch or svc.ingest.rtmp_url("swapped", "alice"), timeout=40)
    return pub


def samples(svc: Service) -> dict[str, float]:
    text = httpx.get(api(svc, "/metrics"), timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("facecast_ingest_")
    }


def lan_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


# ---------------------------------------------------------------------------- 1: who plays


def test_the_raw_input_plays_only_to_facecasts_own_reader(service, live_procs) -> None:
    start_alice(service, live_procs)  # facecast's own reader gets live/alice
    raw = service.ingest.rtmp_url("live", "alice")
    for stranger in (raw, f"{raw}?facecast=guess"):
        with pytest.raises(RuntimeError):
            probe(stranger, timeout=10)
    # (start_alice played swapped/alice without a token: on loopback viewer auth is off.)


def test_nobody_but_facecast_publishes_into_swapped(service, live_procs) -> None:
    # A stranger on loopback takes a swapped key before facecast does: viewers would see it,
    # and facecast's own output would be refused ("already publishing") for as long.
    intruder = live_procs.add(publish(service.ingest.rtmp_url("swapped", "alice"), CLIP, loop=True))
    assert refused(intruder), "nginx let a stranger publish into swapped/alice"
    start_alice(service, live_procs)  # ...while facecast's own output is accepted


def test_stat_and_hls_answer_strangers_only_with_a_token(tmp_path, live_procs) -> None:
    """Off loopback (a token, host 0.0.0.0): /stat is loopback only, and viewers need the
    key's play token, on HLS and on RTMP alike."""
    lan = lan_address()
    if lan is None:
        pytest.skip("no non-loopback address to come from")
    svc = make_service(tmp_path, host="0.0.0.0").start()
    try:
        stat = f"http://{{}}:{svc.ingest.http_port}/stat"
        assert httpx.get(stat.format(lan), timeout=10).status_code == 403
        assert httpx.get(stat.format("127.0.0.1"), timeout=10).status_code == 200
        plain = f"http://{lan}:{svc.ingest.http_port}/hls/alice.m3u8"
        assert httpx.get(plain, timeout=10).status_code == 403
        # the token is checked before the file is looked for: a stream not there yet is a 404
        urls = svc.play_urls("alice")
        assert httpx.get(urls["hls"].replace("127.0.0.1", lan), timeout=10).status_code == 404
    finally:
        svc.stop()


def test_viewers_need_the_keys_play_token_when_viewer_auth_is_on(tmp_path, live_procs) -> None:
    svc = make_service(tmp_path, viewer_auth=True).start()
    try:
        # the play URLs come from the API, behind the token
        assert httpx.get(api(svc, "/api/play/alice"), timeout=10).status_code == 401
        reply = httpx.get(api(svc, "/api/play/alice"), headers=AUTH, timeout=10)
        assert reply.status_code == 200, reply.text
        urls = reply.json()
        assert urls == svc.play_urls("alice")
        unknown = httpx.get(api(svc, "/api/play/mallory"), headers=AUTH, timeout=10)
        assert unknown.status_code == 404

        start_alice(svc, live_procs, watch=urls["rtmp"])
        hls = live_helpers.wait_for_http(urls["hls"], timeout=20).decode()
        assert hls.startswith("#EXTM3U"), hls
        fragment = next(line for line in hls.splitlines() if line.endswith(".ts"))
        base = urls["hls"].rsplit("/", 1)[0]
        assert httpx.get(f"{base}/{fragment}", timeout=10).status_code == 200

        plain_rtmp = svc.ingest.rtmp_url("swapped", "alice")
        bobs = svc.play_urls("bob")
        bobs_token = bobs["rtmp"].split("?token=")[1]
        for stranger in (
            plain_rtmp,
            f"{plain_rtmp}?token=guess",
            f"{plain_rtmp}?token={bobs_token}",
            f"{plain_rtmp}?name=bob&token={bobs_token}",  # nginx's own name= comes first
        ):
            with pytest.raises(RuntimeError):
                probe(stranger, timeout=10)
        hls_port = svc.ingest.http_port
        for stranger in (
            f"http://127.0.0.1:{hls_port}/hls/alice.m3u8",
            f"http://127.0.0.1:{hls_port}/hls/guess/alice.m3u8",
            bobs["hls"].replace("bob.m3u8", "alice.m3u8"),  # bob's token on alice
            bobs["hls"].replace("bob.m3u8", fragment),
        ):
            assert httpx.get(stranger, timeout=10).status_code == 403, stranger
    finally:
        svc.stop()


def test_viewer_auth_is_on_by_default_off_loopback_only(tmp_path) -> None:
    lan = make_service(tmp_path / "lan", host="0.0.0.0")
    local = make_service(tmp_path / "local")
    try:
        assert lan.viewer_auth and not local.viewer_auth
        assert "/_facecast/viewer;" in lan.ingest.render()  # nginx's on_play checks tokens
        assert "/_facecast/viewer;" not in local.ingest.render()
    finally:
        lan.stop()
        local.stop()


# ---------------------------------------------------------------------------- 2: second publisher


def test_a_second_publisher_on_a_key_does_not_end_the_first_ones_stream(
    service, live_procs
) -> None:
    first = start_alice(service, live_procs)
    second = live_procs.add(publish(service.ingest.rtmp_url("live", "alice"), CLIP, loop=True))
    assert refused(second), "nginx let a second publisher onto live/alice"
    # nginx sends publish_done for the refused one too: the stream must not stop on it
    assert not wait_until(lambda: not is_running(service, "alice"), 5)
    # nor on one for any other client (as nginx sends for a publisher it refuses itself)
    hook = api(service, f"/hooks/rtmp/{service._hook_secret}")
    other = {"app": "live", "call": "publish_done", "name": "alice", "clientid": "999999"}
    assert httpx.get(hook, params=other, timeout=10).status_code == 200
    assert not wait_until(lambda: not is_running(service, "alice"), 3)
    wait_for_stream(service.ingest.rtmp_url("swapped", "alice"), timeout=20)
    assert first.poll() is None
    # the publisher that was accepted still ends its stream when it leaves
    stop_process(first)
    assert wait_until(lambda: not is_running(service, "alice"), 30)


# ---------------------------------------------------------------------------- 3: hook secret


def test_hook_calls_without_the_secret_get_403_and_change_nothing(service, live_procs) -> None:
    start_alice(service, live_procs)
    form = {"app": "live", "addr": "127.0.0.1", "clientid": "1", "type": "live"}
    for path in ("/hooks/rtmp", "/hooks/rtmp/guess"):
        started = httpx.post(api(service, path), data={**form, "call": "publish", "name": "bob"})
        assert started.status_code == 403, (path, started.text)
        done = httpx.post(
            api(service, path), data={**form, "call": "publish_done", "name": "alice"}
        )
        assert done.status_code == 403, (path, done.text)
    assert [h.key for h in service.manager.handles()] == ["alice"]  # no pipeline for bob
    assert not wait_until(lambda: not is_running(service, "alice"), 5)


# ---------------------------------------------------------------------------- 10: nginx dies


def test_nginx_killed_is_restarted_counted_and_reported(service, live_procs) -> None:
    ingest = service.ingest
    # While nginx cannot start again (its binary gone mid-upgrade, say), it stays down: so the
    # test sees the down state however quickly a restart would otherwise come.
    ingest.nginx = str(Path(os.devnull).parent / "no-such-nginx")
    os.killpg(ingest.pid, signal.SIGKILL)  # kill -9 of the master and its worker

    def readyz() -> httpx.Response:
        return httpx.get(api(service, "/readyz"), timeout=10)

    assert wait_until(lambda: readyz().status_code == 503, 10), readyz().text
    assert any("ingest" in reason for reason in readyz().json()["reasons"]), readyz().text
    assert httpx.get(api(service, "/healthz"), timeout=10).status_code == 200
    assert samples(service) == {"facecast_ingest_restarts_total": 0.0, "facecast_ingest_up": 0.0}

    ingest.nginx = "nginx"
    assert wait_until(lambda: readyz().status_code == 200, 30), readyz().text
    assert samples(service) == {"facecast_ingest_restarts_total": 1.0, "facecast_ingest_up": 1.0}
    start_alice(service, live_procs)  # publishing works again, hooks and all


def test_readyz_is_not_ready_before_the_ingest_server_has_started(tmp_path) -> None:
    """serve starts its HTTP plane before nginx (nginx's hooks call it): in between, /readyz
    answered 200 and a viewer or publisher who trusted it found the ports closed."""
    svc = make_service(tmp_path)
    try:
        ready = TestClient(svc.app).get("/readyz")
        assert ready.status_code == 503, ready.text
        assert "ingest server not started" in ready.text
    finally:
        svc.stop()
