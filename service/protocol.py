"""The opt-in guarded HTTP protocol (``GGA_GUARDED_PROTOCOL=true``): a header timeout and shedding before parsing.

Off by default. The default server is plain uvicorn, configured through its public
settings only, and the service's own guards are ASGI-level (``service.app``: the body
timeout, 503 before routing while the queue admits nothing). Two guards need the HTTP
protocol itself, below the ASGI interface, and uvicorn has no public hook for them; this
module adds them by subclassing uvicorn's h11 protocol class,
``uvicorn.protocols.http.h11_impl.H11Protocol``, whose internals are not a public API. The
package pins uvicorn (and declares h11) to the range these internals were tested with, and
:func:`check_internals` (run when the class is built, and by the tests) fails loudly,
naming what changed, if an installed release no longer has them. Without the guarded
protocol, put a proxy with a header timeout in front (nginx: ``client_header_timeout``).

**Header timeout** (``GGA_HEADER_TIMEOUT_S``, default 10 s): the whole request line and
header block must arrive within this time, counted

- for the first request of a connection, from the moment the connection is accepted;
- for a later request on a keep-alive connection, from the first byte of that request (the
  idle time before it stays governed by uvicorn's keep-alive timeout, unchanged).

The timer is *not* reset by each byte, so a client that trickles its headers (slowloris)
is cut off like one that stops. When it fires with part of a request head received, the
client gets ``408 Request Timeout`` with the service's error envelope
``{"error": {"type": "request_timeout", ...}}`` and ``Connection: close``, and the connection
is closed; a connection on which nothing at all arrived is closed without an answer (like
uvicorn's keep-alive timeout: a client that has not asked anything is not sent a response).

After a 408 the connection is closed gracefully ("lingering close"): the server shuts down
its sending side, then reads and discards whatever the client still sends until the client
closes (at most ``LINGER_S``, 2 s). Closing at once would make the kernel answer the next
bytes of a client that is still sending with a reset, which can destroy the 408 before the
client reads it.

**Shedding before parsing.** When the service admits nothing now (``shed()``: the queue is
full, or its estimated wait is over the bound), a new request whose first bytes are
``POST /predict`` is answered with a prepared 503 envelope (``Retry-After: 1``,
``Connection: close``) straight from ``data_received``: no h11 parsing, no ASGI call. It is
counted like any response (``on_shed``). The ASGI-level refusal (``service.app``) does the
same after parsing; this one is cheaper per refused request.

The body timeout is not here: it is ASGI-level for every protocol (``GGA_BODY_TIMEOUT_S``,
:func:`service.app.receive_within`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http import h11_impl

from service.errors import envelope

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("service.protocol")

LINGER_S = 2.0  # after a 408: how long the client's further bytes are read and discarded, at most

# What the guarded protocol uses of uvicorn's and h11's internals (checked by check_internals)
UVICORN_PROTOCOL_ATTRIBUTES = ("conn", "cycle", "transport", "loop", "client", "server_state",
                               "timeout_keep_alive_task")
UVICORN_PROTOCOL_METHODS = ("connection_made", "data_received", "handle_events", "connection_lost",
                            "_unset_keepalive_if_required")
H11_NAMES = ("IDLE", "Response", "Data", "EndOfMessage", "ConnectionClosed", "LocalProtocolError")


class InternalsChangedError(RuntimeError):
    """The installed uvicorn/h11 no longer has what the guarded protocol subclasses."""


def check_internals() -> None:
    """Raise :class:`InternalsChangedError` naming each uvicorn/h11 internal the guarded protocol needs and the
    installed release lacks (the class, its methods, the attributes its ``__init__``/``connection_made`` set,
    the cycle's ``response_complete``, the server state's ``default_headers``, h11's states and events)."""
    missing = []
    cls = getattr(h11_impl, "H11Protocol", None)
    if cls is None:
        raise InternalsChangedError("uvicorn.protocols.http.h11_impl.H11Protocol is gone: the guarded protocol "
                                    "(GGA_GUARDED_PROTOCOL) cannot run on this uvicorn; turn it off or pin uvicorn")
    missing += [f"H11Protocol.{m}" for m in UVICORN_PROTOCOL_METHODS if not callable(getattr(cls, m, None))]
    source = inspect.getsource(cls)
    missing += [f"H11Protocol.{a} (an instance attribute)" for a in UVICORN_PROTOCOL_ATTRIBUTES
                if f"self.{a} =" not in source and f"self.{a}: " not in source]
    params = list(inspect.signature(cls.__init__).parameters)
    if params[1:4] != ["config", "server_state", "app_state"]:
        missing.append(f"H11Protocol.__init__(config, server_state, app_state) (now {params[1:]})")
    cycle = getattr(h11_impl, "RequestResponseCycle", None)
    if cycle is None or "self.response_complete =" not in inspect.getsource(cycle):
        missing.append("RequestResponseCycle.response_complete")
    try:
        from uvicorn.server import ServerState

        if not isinstance(ServerState().default_headers, list):
            missing.append("ServerState.default_headers (a list of header pairs)")
    except (ImportError, AttributeError):
        missing.append("uvicorn.server.ServerState.default_headers")
    missing += [f"h11.{n}" for n in H11_NAMES if not hasattr(h11, n)]
    if not hasattr(h11.Connection, "trailing_data"):
        missing.append("h11.Connection.trailing_data")
    if missing:
        raise InternalsChangedError("the guarded protocol (GGA_GUARDED_PROTOCOL) needs uvicorn/h11 internals that "
                                    "the installed release lacks: " + ", ".join(missing)
                                    + "; turn GGA_GUARDED_PROTOCOL off or install the uvicorn range pyproject.toml "
                                    "pins")


class GuardedH11Protocol(h11_impl.H11Protocol):
    """uvicorn's h11 protocol with a header timeout and shedding before parsing (see the module doc).

    uvicorn instantiates the class itself, so the configuration is class attributes; use
    :func:`guarded_protocol` for a subclass configured from the settings.
    """

    header_timeout_s: float = 10.0
    shed: Callable[[], bool] | None = None  # True: a new POST /predict is refused before parsing
    on_shed: Callable[[], None] | None = None  # counts a request refused so

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # a 408 or a shed 503 was sent: reading only to discard, until the client closes
        self._linger_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- uvicorn hooks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after the 408 (or a shed 503): the client's bytes are discarded
        if self.shed is not None and self._starts_predict(data) and self.shed():
            self._shed_now()
            return
        super().data_received(data)

    def handle_events(self) -> None:
        # Called by data_received (bytes arrived, the keep-alive timer already cancelled) and
        # by on_response_complete (next pipelined request), always after h11 got the bytes.
        super().handle_events()
        self._update_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    # ---------------------------------------------------------------- shedding

    def _starts_predict(self, data: bytes) -> bool:
        """The first bytes of a new request, and that request is ``POST /predict``."""
        return (data[:13] == b"POST /predict" and data[13:14] in (b" ", b"?")
                and self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
                and not self.conn.trailing_data[0] and (self.cycle is None or self.cycle.response_complete))

    def _shed_now(self) -> None:
        """The prepared 503, then the same graceful close as after a 408."""
        self._unset_keepalive_if_required()
        if self.on_shed is not None:
            try:
                self.on_shed()
            except Exception:  # noqa: BLE001 - counting must never break the answer
                log.exception("counting a shed request failed")
        self.transport.write(SHED_RESPONSE)
        self._linger_close()

    # ---------------------------------------------------------------- the header timer

    def _switched_away(self) -> bool:
        """Whether the transport now belongs to another protocol (a WebSocket upgrade)."""
        return self.transport.get_protocol() is not self

    def _update_timer(self) -> None:
        if self._lingering or self.transport.is_closing() or self._switched_away():
            self._cancel_timer()
            return
        if self.conn.their_state is h11.IDLE:
            # Waiting for a request head. With the keep-alive timer armed the connection is idle
            # and uvicorn's keep-alive applies; otherwise bytes of a head have arrived (the first
            # byte cancels the keep-alive timer).
            if self._header_timer is None and self.timeout_keep_alive_task is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)
        else:
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._switched_away() or self.conn.their_state is not h11.IDLE:
            return
        partial = bool(self.conn.trailing_data[0])
        if partial and self.conn.our_state is h11.IDLE:
            log.info("%s: request headers not complete within %g s: 408, connection closed", self._peer(),
                     self.header_timeout_s)
            self._send_408(f"the request headers were not received within {self.header_timeout_s:g} s")
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # pragma: no cover - the state forbids it; close anyway
            pass
        self.transport.close()

    # ---------------------------------------------------------------- helpers

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"

    def _send_408(self, message: str) -> None:
        """Answer 408 with the error envelope, then close the connection gracefully (lingering close)."""
        response = envelope(408, "request_timeout", message)
        headers = [*self.server_state.default_headers, *response.raw_headers, (b"connection", b"close")]
        try:
            data = self.conn.send(h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"))
            data += self.conn.send(h11.Data(data=response.body))  # type: ignore[operator]
            data += self.conn.send(h11.EndOfMessage())  # type: ignore[operator]
        except h11.LocalProtocolError:  # pragma: no cover - nothing may be sent in this state
            self.transport.close()
            return
        self.transport.write(data)
        self._linger_close()

    def _linger_close(self) -> None:
        """Close after an answer the client may still be sending into (a 408, a shed 503)."""
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        # Half-close: the answer and a FIN go out; the client's further bytes are read and dropped
        # (data_received) until it closes (eof_received: uvicorn's returns None, so the transport
        # closes itself) or LINGER_S passes.
        self._cancel_timer()
        self._lingering = True
        self.transport.write_eof()
        self.transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)


def _shed_response() -> bytes:
    body = envelope(503, "overloaded", "the queue is full; retry later").body
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head + body


SHED_RESPONSE = _shed_response()


def guarded_protocol(settings: Settings, app: Any = None) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with the header timeout of ``settings``; given the
    service's ``app``, it also sheds ``POST /predict`` before parsing while the app admits nothing.
    Raises :class:`InternalsChangedError` when the installed uvicorn/h11 lack what it needs."""
    check_internals()

    def shed() -> bool:
        state = app.state
        batcher = getattr(state, "batcher", None)
        return bool(getattr(state, "ready", False)) and batcher is not None and not batcher.admits(1)

    def on_shed() -> None:
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.requests.labels(route="/predict", status="503").inc()
            metrics.request_seconds.labels(route="/predict").observe(0.0)

    class ConfiguredGuardedH11Protocol(GuardedH11Protocol):
        header_timeout_s = settings.server.header_timeout_s

    if app is not None:
        ConfiguredGuardedH11Protocol.shed = staticmethod(shed)
        ConfiguredGuardedH11Protocol.on_shed = staticmethod(on_shed)
    return ConfiguredGuardedH11Protocol
