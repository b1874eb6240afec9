"""URL helpers shared by the live inputs and outputs: query merging, redaction for logs, and
a free loopback UDP port (for the SRT bridges)."""

from __future__ import annotations

import socket
from urllib.parse import parse_qsl, urlsplit, urlunsplit


def with_query(target: str, extra: dict[str, str]) -> str:
    """``target`` with ``extra`` query parameters added; the URL's own values win."""
    parts = urlsplit(target)
    query = dict(extra)
    query.update(parse_qsl(parts.query, keep_blank_values=True))
    text = "&".join(f"{k}={v}" if v != "" else k for k, v in query.items())
    return urlunsplit(parts._replace(query=text))


def free_udp_port() -> int:
    """A loopback UDP port nobody is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redact(url: str) -> str:
    """``url`` for logs: user:password@ is dropped and every query value is masked.

    Secrets ride in query strings (a stream key or token, an SRT passphrase, the secret
    facecast's own workers add as ``?facecast=``) and a value's name does not tell which
    ones are secret, so none is shown; the names stay, to show which options were given.
    """
    parts = urlsplit(url)
    if parts.password is None and parts.username is None and not parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None or parts.username is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6 keeps its brackets
        netloc = f"{host}:{parts.port}" if parts.port else host
    # a bare item (no "=") may be a value on its own: masked as well
    query = "&".join(
        f"{item.split('=', 1)[0]}=…" if "=" in item else "…"
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


__all__ = ["free_udp_port", "redact", "with_query"]
