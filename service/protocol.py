"""uvicorn's h11 protocol with read timeouts for slow clients (slowloris and stalled bodies).

uvicorn (h11) bounds only the idle time between keep-alive requests (``timeout_keep_alive``),
and that timer is cancelled by the first byte that arrives. Nothing bounds how long a client
may take to send a request's header block, nor a body that stops arriving: such connections
are held open indefinitely. :class:`SlowClientH11Protocol` adds two timers per connection:

**Header timeout** (``header_timeout_s``, ``GGA_HEADER_TIMEOUT_S``, default 10 s): the whole
request line and header block must arrive within this time, counted

- for the first request of a connection, from the moment the connection is accepted;
- for a later request on a keep-alive connection, from the first byte of that request (the
  idle time before it stays governed by uvicorn's keep-alive timeout, unchanged; where that
  timer is gone, after a request body that ended only after its response, the header
  timeout bounds the idle time as well).

The timer is *not* reset by each byte, so a client that trickles its headers (slowloris)
is cut off like one that stops. When it fires with part of a request head received, the
client gets ``408 Request Timeout`` with the service's error envelope
``{"error": {"type": "request_timeout", ...}}`` and ``Connection: close``, and the connection
is closed; a connection on which nothing at all arrived is closed without an answer (like
uvicorn's keep-alive timeout: a client that has not asked anything is not sent a response).

**Body timeout** (``body_timeout_s``, ``GGA_BODY_TIMEOUT_S``, default 30 s): while a request
body is still being received, at most this long may pass without any body bytes arriving.
It is an inactivity bound, restarted by every chunk that arrives, not a bound on the total
upload time (the body size is bounded by ``max_request_bytes``/``max_fit_bytes``); a client
that keeps sending something within every period is not cut off. The clock is held while
the client cannot be blamed for the silence: while reading is paused by uvicorn's flow
control (more than 64 KiB buffered that the app has not consumed yet) and while the client
waits for ``100 Continue`` (sent when the app first asks for the body). When it fires and no
response has begun, the request ends: the app's ``receive()`` returns ``http.disconnect``
(the service answers that as a client disconnect; its sends are dropped), the client gets
the 408 envelope and the connection is closed. If the response has already begun (the app
answered without reading the whole body), the connection is just closed.

After a 408 the connection is closed gracefully ("lingering close"): the server shuts down
its sending side, then reads and discards whatever the client still sends until the client
closes (at most ``LINGER_S``, 2 s). Closing at once would make the kernel answer the next
bytes of a client that is still sending with a reset, which can destroy the 408 before the
client reads it.

**Shedding before parsing.** Under overload most requests are refused, and each refusal
costs the event loop, which shares the cores with the model. When the service says it
admits nothing now (``shed()``: the queue is full, or its estimated wait is over the
bound), a new request whose first bytes are ``POST /predict`` is answered with a
prepared 503 envelope (``Retry-After: 1``, ``Connection: close``) straight from
``data_received``: no h11 parsing, no routing, no middleware. It is counted like any
response (``on_shed``). Every other request (probes, ``/metrics``, ``/info``) goes the
normal way.

Neither timer bounds the app's own processing time (``request_timeout_s`` does that for
the queue) nor a client reading the response slowly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import envelope

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("service.protocol")

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
LINGER_S = 2.0  # after a 408: how long the client's further bytes are read and discarded, at most


class _ReadWatchingFlow(FlowControl):
    """uvicorn's flow control, telling the protocol each time reading is resumed.

    ``RequestResponseCycle.receive()`` calls ``resume_reading()`` every time the app asks
    for body bytes (after sending any ``100 Continue``), and the protocol calls it after a
    response; either way the client may send again from that moment on.
    """

    def __init__(self, transport: asyncio.Transport, on_resume: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        super().resume_reading()
        self._on_resume()


class SlowClientH11Protocol(H11Protocol):
    """:class:`H11Protocol` with a header timeout and a body inactivity timeout (see the module doc).

    uvicorn instantiates the class itself, so the timeouts are class attributes; use
    :func:`slow_client_protocol` for a subclass configured from the settings.
    """

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    shed: Callable[[], bool] | None = None  # True: a new POST /predict is refused before parsing
    on_shed: Callable[[], None] | None = None  # counts a request refused so

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0
        self._lingering = False  # a 408 was sent: reading only to discard, until the client closes
        self._linger_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- uvicorn hooks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _ReadWatchingFlow(transport, self._body_progress)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after the 408 (or a shed 503): the client's bytes are discarded
        if self.shed is not None and self._starts_predict(data) and self.shed():
            self._shed_now()
            return
        super().data_received(data)

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

    def handle_events(self) -> None:
        # Called by data_received (bytes arrived, the keep-alive timer already cancelled) and
        # by on_response_complete (next pipelined request), always after h11 got the bytes.
        super().handle_events()
        self._update_timers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    # ---------------------------------------------------------------- timers

    def _switched_away(self) -> bool:
        """Whether the transport now belongs to another protocol (a WebSocket upgrade)."""
        return self.transport.get_protocol() is not self

    def _update_timers(self) -> None:
        if self._lingering or self.transport.is_closing() or self._switched_away():
            self._cancel_timers()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            # Waiting for a request head. With the keep-alive timer armed the connection is idle
            # and uvicorn's keep-alive applies; otherwise bytes of a head have arrived (the first
            # byte cancels the keep-alive timer), or a late body ended with no timer left.
            if self._header_timer is None and self.timeout_keep_alive_task is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if state is h11.SEND_BODY:
            self._body_progress()
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _body_progress(self) -> None:
        """Restart the body clock (bytes arrived, or the app asked for more): a new deadline, one timer."""
        if self._lingering or self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        self._body_deadline = self.loop.time() + self.body_timeout_s
        if self._body_timer is None:
            self._body_timer = self.loop.call_at(self._body_deadline, self._body_timer_fired)

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

    def _body_timer_fired(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._switched_away() or self.conn.their_state is not h11.SEND_BODY:
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and getattr(cycle, "waiting_for_100_continue", False)):
            self._body_deadline = now + self.body_timeout_s  # not the client's silence: the clock is held
        if now < self._body_deadline:
            self._body_timer = self.loop.call_at(self._body_deadline, self._body_timer_fired)
            return
        if cycle is not None and not cycle.response_started and not cycle.disconnected:
            log.info("%s: no request body bytes for %g s: 408, connection closed", self._peer(), self.body_timeout_s)
            # From here the app's receive() returns http.disconnect and its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            self._send_408(f"the request body stalled: no bytes received for {self.body_timeout_s:g} s")
            return
        log.info("%s: request body stalled for %g s after the response began: connection closed", self._peer(),
                 self.body_timeout_s)
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
        # Half-close: the 408 and a FIN go out; the client's further bytes are read and dropped
        # (data_received) until it closes (eof_received: uvicorn's returns None, so the transport
        # closes itself) or LINGER_S passes.
        self._cancel_timers()
        self._lingering = True
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)


def _shed_response() -> bytes:
    body = envelope(503, "overloaded", "the queue is full; retry later").body
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head + body


SHED_RESPONSE = _shed_response()


def slow_client_protocol(settings: Settings, app: Any = None) -> type[SlowClientH11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)``, with the timeouts of ``settings``; given the
    service's ``app``, it also sheds ``POST /predict`` before parsing while the app admits nothing."""

    def shed() -> bool:
        state = app.state
        batcher = getattr(state, "batcher", None)
        return bool(getattr(state, "ready", False)) and batcher is not None and not batcher.admits(1)

    def on_shed() -> None:
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.requests.labels(route="/predict", status="503").inc()
            metrics.request_seconds.labels(route="/predict").observe(0.0)

    class ConfiguredSlowClientH11Protocol(SlowClientH11Protocol):
        header_timeout_s = settings.header_timeout_s
        body_timeout_s = settings.body_timeout_s

    if app is not None:
        ConfiguredSlowClientH11Protocol.shed = staticmethod(shed)
        ConfiguredSlowClientH11Protocol.on_shed = staticmethod(on_shed)
    return ConfiguredSlowClientH11Protocol
