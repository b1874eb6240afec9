"""The HTTP plane's server: uvicorn on a thread of its own, with deadlines for slow clients,
and the start-wait-stop of the services that run one.

A client gets ``HEADER_TIMEOUT`` seconds to send a request's head and ``BODY_TIMEOUT``
seconds between pieces of its body (``ThreadedServer``), so stalled requests do not pile
up; past either it gets 408 and its connection closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import h11
import uvicorn
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from facecast.errors import FacecastError

log = logging.getLogger(__name__)

# Slow clients: seconds to send a request's head (from its first byte, or from the
# connection when nothing came yet), and seconds the server waits for each piece of a body
# it is reading. Generous for a person's curl, short for a connection held open on purpose.
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0


class Runnable(ABC):
    """A service that ``start``s, serves until told to, and ``stop``s: ``run(stop)`` is
    that, for ``facecast serve`` and ``facecast web`` alike."""

    @abstractmethod
    def start(self) -> object:
        """Start serving; return once serving."""

    @abstractmethod
    def stop(self) -> None:
        """Stop everything ``start`` started."""

    def run(self, stop: threading.Event) -> None:
        """``start``, wait for ``stop`` to be set, then ``stop`` (also on an error)."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()


class ThreadedServer:
    """uvicorn on a thread of its own (``serve`` and ``web`` share it). ``start`` returns
    once the port is bound, or raises: a port in use must not leave a service that only
    looks up. ``header_timeout`` and ``body_timeout``: see ``HEADER_TIMEOUT``,
    ``BODY_TIMEOUT``; a request that runs past either gets 408 and its connection closes."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        name: str = "http",
        *,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        config = uvicorn.Config(
            BodyTimeout(app, body_timeout),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            # uvicorn times out only idle kept-alive connections: the head of a request
            # gets a deadline from this protocol (h11, the parser uvicorn picks anyway)
            http=functools.partial(TimedH11Protocol, header_timeout=header_timeout),  # type: ignore[arg-type]
        )
        self.server = uvicorn.Server(config)
        self.where = f"{host}:{port}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn's way to say it could not bind; start() reports it
            log.debug("uvicorn on %s exited at startup", self.where)

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            self.stop()
            raise FacecastError(f"the HTTP server did not start on {self.where} (port in use?)")

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head: ``header_timeout``
    seconds from the connection (nothing sent yet) or from the first byte of a request on a
    kept-alive one. Past it, 408 and the connection closes (just closes when nothing at all
    came). Idle kept-alive connections are uvicorn's own ``timeout_keep_alive``; bodies are
    ``BodyTimeout``'s."""

    def __init__(self, *args: Any, header_timeout: float = HEADER_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()  # the head is in: the app's (and the body's) now
        elif self._head_deadline is None and self.conn.trailing_data[0]:
            self._arm_head_deadline()  # part of the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        transport = self.transport
        # still this protocol's (not upgraded), still open, still waiting for a head
        if transport.is_closing() or transport.get_protocol() is not self:
            return
        if self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # a request had begun: say why it ends
            reason = f"request head not received within {self.header_timeout:g} s".encode()
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(reason), reason)
            )
        transport.close()


class BodyTimeout:
    """ASGI middleware: while the app reads a request's body, each piece must come within
    ``timeout`` seconds, else the read raises HTTPException 408 (so the route's own error
    handling answers, and nothing half-uploaded is used) and the connection closes. Once the
    body is complete, reads wait as long as they like (they then only signal a disconnect)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout(self.timeout):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"request body: nothing received for {self.timeout:g} s",
                    headers={"Connection": "close"},
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, timed_receive, send)
