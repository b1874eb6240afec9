"""The ingest's nginx config: ``deploy/nginx/nginx.conf.template`` rendered for one instance,
the URLs it serves, and who may do what there.

Who may do what (``IngestAccess``, rendered into the config):

- ``live/KEY`` plays to loopback only; with a ``worker_secret`` (``facecast serve``), only
  to a reader whose URL carries it (``?facecast=SECRET``): facecast's own.
- ``swapped/KEY`` takes publishers from loopback only; with a worker secret, only the one
  that carries it: facecast's own output.
- With a ``play_secret`` (viewer auth), viewers need the key's play token: HLS at
  ``/hls/TOKEN/KEY.m3u8``, RTMP at ``swapped/KEY?token=TOKEN``.
- ``/stat`` answers loopback only.

nginx checks the secrets and tokens itself (``on_play``/``on_publish`` pointed at its own
HTTP server, ``secure_link``): no check waits on facecast, whose RTMP connects hold the GIL.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from facecast.errors import FacecastError

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "nginx.conf.template"
# Where Debian's libnginx-mod-rtmp installs the module (nginx -V: --modules-path).
DEBIAN_MODULES_DIR = Path("/usr/lib/nginx/modules")
RTMP_MODULE_NAME = "ngx_rtmp_module.so"
FIX = "install it with scripts/setup (Debian packages nginx and libnginx-mod-rtmp)"
HOST = "127.0.0.1"


class IngestError(FacecastError):
    """The ingest server cannot start or stop (nginx or its RTMP module missing, port taken)."""


def find_rtmp_module(nginx: str = "nginx") -> Path:
    """Where this nginx looks for modules (``nginx -V``: --modules-path) + ngx_rtmp_module.so.

    Falls back to Debian's directory; the file may not exist (start() checks and says why).
    """
    binary = shutil.which(nginx)
    if binary:
        try:
            info = subprocess.run(
                [binary, "-V"], capture_output=True, text=True, timeout=5, check=False
            ).stderr
        except (OSError, subprocess.TimeoutExpired):
            info = ""
        match = re.search(r"--modules-path=(\S+)", info)
        if match:
            return Path(match.group(1)) / RTMP_MODULE_NAME
    return DEBIAN_MODULES_DIR / RTMP_MODULE_NAME


def play_token(key: str, secret: str) -> str:
    """The token that lets a viewer watch ``key``: what nginx's ``secure_link_md5 "$key
    SECRET"`` expects, base64url of the MD5 without padding. One token per key: it opens
    that key's HLS and RTMP output and no other key's."""
    # MD5 because secure_link_md5 is what nginx has; the secret is 256 random bits, and
    # it comes last, so MD5's length extension cannot forge another key's token.
    digest = hashlib.md5(f"{key} {secret}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class IngestAccess:
    """Who may do what on the ingest (see the module's docstring). ``listen``: the address
    it serves other machines at (clients on this machine still use 127.0.0.1, ``rtmp_url``);
    ``worker_secret``: only URLs with ``?facecast=SECRET`` play ``live`` and publish
    ``swapped``; ``play_secret``: viewer auth on, tokens are ``play_token(key, secret)``;
    ``remote_workers``: facecast's workers read ``live`` and publish ``swapped`` from other
    machines (``serve --role ingest``): any address may, with the worker secret."""

    listen: str = HOST
    worker_secret: str | None = None
    play_secret: str | None = None
    remote_workers: bool = False

    def __post_init__(self) -> None:
        if self.remote_workers and not self.worker_secret:
            # the secret is then the only thing between the raw inputs and the world
            raise IngestError("workers on other machines need a worker secret")


LOCAL_ONLY = IngestAccess()  # loopback, no secrets: a bare ingest (scripts/ingest, tests)


@dataclass(eq=False)
class NginxConfig:
    """One instance's config: its ports, the publish hook, who may do what, and which
    nginx, RTMP module and template (``nginx``, ``rtmp_module`` and ``template`` exist so
    tests, and odd installs, can point at other files).

    ``on_publish_url``: asked about every publish on ``live`` (form field ``call``:
    ``publish``), and told when it ends (``publish_done``). POSTed, or with a
    ``worker_secret`` sent as GET arguments (nginx-rtmp has one method per application)."""

    rtmp_port: int = 1935
    http_port: int = 8088
    on_publish_url: str | None = None
    access: IngestAccess = LOCAL_ONLY
    nginx: str = "nginx"
    rtmp_module: Path | None = None
    template: Path = TEMPLATE
    # A check that is off keeps its location in the config, with a secret nobody is given,
    # so nothing passes it.
    _unused_secret: str = field(
        init=False, repr=False, default_factory=lambda: secrets.token_urlsafe(32)
    )

    def rtmp_url(self, app: str, key: str) -> str:
        """``rtmp://127.0.0.1:PORT/APP/KEY``; app is ``live`` (publishers) or ``swapped``."""
        return f"rtmp://{HOST}:{self.rtmp_port}/{app}/{key}"

    def hls_url(self, key: str, host: str = HOST) -> str:
        """The HLS playlist of ``swapped/KEY`` (with viewer auth: its signed path)."""
        if self.access.play_secret:
            return f"http://{host}:{self.http_port}/hls/{self.play_token(key)}/{key}.m3u8"
        return f"http://{host}:{self.http_port}/hls/{key}.m3u8"

    def play_token(self, key: str) -> str:
        """The viewer token of ``key``; raises IngestError when viewer auth is off."""
        if not self.access.play_secret:
            raise IngestError("viewer auth is off: there are no play tokens")
        return play_token(key, self.access.play_secret)

    def worker_url(self, app: str, key: str) -> str:
        """``rtmp_url`` with the worker secret: what facecast's own reader plays (live) and
        its own output publishes (swapped)."""
        url = self.rtmp_url(app, key)
        return f"{url}?facecast={self.access.worker_secret}" if self.access.worker_secret else url

    def play_urls(self, key: str, host: str = HOST) -> dict[str, str]:
        """Where a viewer watches ``swapped/KEY``: ``rtmp`` and ``hls``, signed with the
        key's play token when viewer auth is on."""
        rtmp = f"rtmp://{host}:{self.rtmp_port}/swapped/{key}"
        if self.access.play_secret:
            rtmp += f"?token={self.play_token(key)}"
        return {"rtmp": rtmp, "hls": self.hls_url(key, host)}

    @property
    def stat_url(self) -> str:
        """nginx-rtmp's XML statistics (publishers and readers per stream)."""
        return f"http://{HOST}:{self.http_port}/stat"

    def render_for(self, prefix: Path) -> str:
        """The template with every @NAME@ filled in for an instance in ``prefix``."""
        if not self.template.is_file():
            raise IngestError(f"nginx config template not found: {self.template}")
        module = self.rtmp_module or find_rtmp_module(self.nginx)
        if self.on_publish_url:
            # One URL for both: nginx-rtmp says which in the form field "call"
            # (publish / publish_done), so a key's pipeline can start and stop with it.
            url = self.on_publish_url
            on_publish = f"on_publish {url}; on_publish_done {url};"
        else:
            on_publish = "# on_publish http://127.0.0.1:PORT/PATH;  (off)"
        checks = f"http://{HOST}:{self.http_port}/_facecast"
        live_auth, swapped_auth = ["# worker secret off"], ["# worker secret off"]
        if self.access.worker_secret:
            live_auth = ["notify_method get;", f"on_play {checks}/worker;"]
            swapped_auth = ["notify_method get;", f"on_publish {checks}/worker;"]
        if self.access.play_secret:
            swapped_auth += [
                "# viewer auth" if self.access.worker_secret else "notify_method get;",
                f"on_play {checks}/viewer;",
            ]
            hls_open = "return 403;  # viewer auth: only /hls/TOKEN/... serves"
        else:
            swapped_auth.append("# viewer auth off: anyone who reaches the port may watch")
            hls_open = "# viewer auth off: open"
        indent = "\n" + " " * 12
        # As root, nginx would run its worker as "nobody", which cannot write HLS files under
        # a prefix private to root (pytest's tmp_path is 0700). This is a loopback-only server.
        user = "user root;" if os.geteuid() == 0 else "# user: unchanged (not started as root)"
        values = {
            "RTMP_MODULE": str(module),
            "PREFIX": str(prefix.resolve()),
            "USER": user,
            "RTMP_PORT": str(self.rtmp_port),
            "HTTP_PORT": str(self.http_port),
            "ON_PUBLISH": on_publish,
            "LIVE_AUTH": indent.join(live_auth),
            "SWAPPED_AUTH": indent.join(swapped_auth),
            "HLS_OPEN": hls_open,
            "WORKER_SECRET": self.access.worker_secret or self._unused_secret,
            "PLAY_SECRET": self.access.play_secret or self._unused_secret,
            "LISTEN": self.access.listen,
            "LIVE_PLAY_FROM": self._from("play"),
            "SWAPPED_PUBLISH_FROM": self._from("publish"),
        }
        text = self.template.read_text()
        for name, value in values.items():
            text = text.replace(f"@{name}@", value)
        left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
        if left:
            raise IngestError(f"{self.template}: unknown placeholders {', '.join(left)}")
        return text

    def _from(self, action: str) -> str:
        """The RTMP allow/deny lines for ``action`` (play, publish) by facecast's workers."""
        if self.access.remote_workers:
            return f"allow {action} all;  # workers on other machines: the secret decides"
        return f"allow {action} 127.0.0.1;\n{' ' * 12}deny {action} all;"

    def check_install(self) -> str:
        """The nginx binary's path; raises IngestError naming the fix if anything is missing."""
        binary = shutil.which(self.nginx)
        if binary is None:
            raise IngestError(f"nginx not found ({self.nginx!r} is not on PATH): {FIX}")
        module = self.rtmp_module or find_rtmp_module(self.nginx)
        if not Path(module).is_file():
            raise IngestError(f"nginx RTMP module not found at {module}: {FIX}")
        return binary
