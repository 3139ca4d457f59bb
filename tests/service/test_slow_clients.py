"""Read timeouts for slow clients: slowloris headers (the opt-in guarded protocol, service/protocol.py)
and stalled bodies (ASGI level, service.app.receive_within, with every protocol).

In process: :class:`GuardedH11Protocol` on a loopback asyncio server with a tiny ASGI app and
short timeouts; ``receive_within`` on a fake ``receive``; the check of the uvicorn/h11 internals
the guarded protocol needs. Against the real server: ``gga-serve`` as a subprocess with the
guarded protocol, a 1 s header timeout and a 1 s body timeout, raw sockets. Time bounds are
generous (the suite runs on two loaded cores): what is asserted is that the connection is
closed, not held open indefinitely.
"""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import subprocess
import time

import pytest
import uvicorn
from uvicorn.protocols.http import h11_impl
from uvicorn.server import ServerState

from benchmarks.serverproc import start_server, stop_server
from service import protocol
from service.app import BodyTimeoutError, receive_within
from service.protocol import GuardedH11Protocol, InternalsChangedError, check_internals, guarded_protocol
from service.settings import Settings, SettingsError

SLACK_S = 5.0  # a closed connection must be seen within timeout + this


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_408(raw: bytes, phase: str) -> None:
    status, headers, body = parse_response(raw)
    assert status == 408, raw
    assert headers["content-type"] == "application/json" and headers["connection"] == "close", headers
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == "request_timeout", error
    assert phase in error["message"], error


# ------------------------------------------------------------------------- in process


class App:
    """/ answers 200 "ok" without reading the body; /echo reads the whole body first (recording
    every receive() event) and answers its length; /late waits 0.6 s before reading the body."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        if scope["path"] in ("/echo", "/late"):
            if scope["path"] == "/late":
                await asyncio.sleep(0.6)
            size = 0
            while True:
                message = await receive()
                self.events.append(message)
                if message["type"] == "http.disconnect":
                    return
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = str(size).encode()
        else:
            body = b"ok"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Served:
    """A loopback asyncio server speaking the guarded protocol (header timeout 0.3 s, uvicorn's
    keep-alive 5 s); raw connections through :meth:`connect`."""

    def __init__(self, header_s: float = 0.3, keep_alive_s: float = 5.0) -> None:
        settings = Settings(_env_file=None, guarded_protocol=True, header_timeout_s=header_s)
        self.protocol = guarded_protocol(settings)
        self.app = App()
        self.config = uvicorn.Config(self.app, http=self.protocol, lifespan="off", log_config=None,
                                     timeout_keep_alive=keep_alive_s)
        self.state = ServerState()

    async def __aenter__(self) -> Served:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self.protocol(config=self.config, server_state=self.state, app_state={}), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for conn in list(self.state.connections):
            conn.transport.close()
        await self.server.wait_closed()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def read_one(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, headers, _ = parse_response(head)
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 5)
    return status, headers, body


async def until_closed(reader: asyncio.StreamReader, limit: float = 0.3 + SLACK_S) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took."""
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit)  # read() to EOF; wait_for fails if it stays open
    return data, time.monotonic() - t0


def test_factory_carries_the_settings():
    s = Settings(_env_file=None)
    assert (s.server.guarded_protocol, s.server.header_timeout_s, s.server.body_timeout_s) == (False, 10.0, 30.0)
    cls = guarded_protocol(Settings(_env_file=None, guarded_protocol=True, header_timeout_s=2.5))
    assert issubclass(cls, GuardedH11Protocol) and issubclass(cls, h11_impl.H11Protocol)
    assert cls.header_timeout_s == 2.5 and cls.shed is None
    with pytest.raises(SettingsError, match="GGA_HEADER_TIMEOUT_S=0: Input should be greater than 0"):
        Settings(_env_file=None, header_timeout_s=0)


def test_the_uvicorn_internals_the_guarded_protocol_needs_are_there(monkeypatch):
    """Fails, naming the internal, when an installed uvicorn/h11 release no longer has what
    service/protocol.py subclasses or reads (pyproject.toml pins the range this passed with)."""
    check_internals()
    monkeypatch.delattr(h11_impl.H11Protocol, "_unset_keepalive_if_required")
    with pytest.raises(InternalsChangedError, match=r"lacks: H11Protocol\._unset_keepalive_if_required;"):
        check_internals()
    monkeypatch.delattr(h11_impl, "H11Protocol")
    with pytest.raises(InternalsChangedError, match=r"h11_impl\.H11Protocol is gone"):
        guarded_protocol(Settings(_env_file=None, guarded_protocol=True))


def test_in_process_header_timeouts(monkeypatch):
    monkeypatch.setattr(protocol, "LINGER_S", 0.3)

    async def main():
        async with Served() as srv:
            # a partial head: 408 envelope, then the server's side is shut (EOF here)
            r, w = await srv.connect()
            t0 = time.monotonic()
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            data, _ = await until_closed(r)
            assert_408(data, "headers")
            assert 0.25 < time.monotonic() - t0 < 0.3 + SLACK_S
            # lingering close: what the client still sends is discarded, and a client that does not
            # close is closed after LINGER_S
            w.write(b"X-More: still sending\r\n")
            await asyncio.sleep(0.05)
            assert len(srv.state.connections) == 1
            deadline = time.monotonic() + 0.3 + SLACK_S
            while srv.state.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not srv.state.connections
            w.close()

            # nothing at all: closed without an answer
            r, w = await srv.connect()
            data, _ = await until_closed(r)
            assert data == b""
            w.close()

            # keep-alive: the idle time between requests is uvicorn's (5 s here), not the header
            # timeout; the next request's header clock starts at its first byte
            r, w = await srv.connect()
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_one(r))[::2] == (200, b"ok")
            await asyncio.sleep(0.6)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_one(r))[::2] == (200, b"ok")
            await asyncio.sleep(0.6)
            t0 = time.monotonic()
            w.write(b"GET / HTTP/1.1\r\n")
            data, _ = await until_closed(r)
            assert_408(data, "headers")
            assert time.monotonic() - t0 > 0.25  # counted from the first byte, not from the last response
            w.close()

    asyncio.run(main())


class Arrivals:
    """A fake ASGI ``receive``: each message after its delay (seconds after the previous call);
    ``None`` as a delay: it never arrives."""

    def __init__(self, *timed: tuple[float | None, dict]) -> None:
        self.timed = list(timed)

    async def __call__(self) -> dict:
        delay, message = self.timed.pop(0)
        if delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(delay)
        return message


def _chunk(body: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


def test_body_timeout_at_the_asgi_level():
    async def main():
        # a body that stalls: BodyTimeoutError (408, Connection: close) after the timeout
        receive = receive_within(Arrivals((0.0, _chunk(b"abc")), (None, _chunk(b"never"))), 0.3)
        assert (await receive())["body"] == b"abc"
        t0 = time.monotonic()
        with pytest.raises(BodyTimeoutError) as caught:
            await receive()
        assert 0.25 < time.monotonic() - t0 < 0.3 + SLACK_S
        exc = caught.value
        assert (exc.status, exc.type, exc.headers) == (408, "request_timeout", {"Connection": "close"})
        assert exc.message == "the request body stalled: no bytes received for 0.3 s"

        # a body trickled slower in total than the timeout, each chunk within it: all of it arrives
        chunks = [(0.12, _chunk(bytes([b]), more=i < 5)) for i, b in enumerate(b"abcdef")]
        receive = receive_within(Arrivals(*chunks), 0.3)
        got = [await receive() for _ in range(6)]
        assert b"".join(m["body"] for m in got) == b"abcdef" and not got[-1]["more_body"]

        # after the last body message: waiting for http.disconnect has no deadline
        receive = receive_within(Arrivals((0.0, _chunk(b"x", more=False)), (0.5, {"type": "http.disconnect"})), 0.3)
        assert (await receive())["body"] == b"x"
        assert await receive() == {"type": "http.disconnect"}

    asyncio.run(main())


# ------------------------------------------------------------------------- the real server

HEADER_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"GGA_GUARDED_PROTOCOL": "true", "GGA_HEADER_TIMEOUT_S": str(HEADER_S), "GGA_BODY_TIMEOUT_S": "1",
           "GGA_ARTIFACT_DIR": str(tmp_path_factory.mktemp("slow") / "a"), "GGA_LOG_LEVEL": "warning",
           "GGA_STRATEGY": "device"}
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield int(base.rsplit(":", 1)[1])
    finally:
        out = stop_server(proc)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out


def raw_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(HEADER_S + SLACK_S)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):  # socket.timeout (a test failure) if the server holds it open
        data += chunk
    return data


def test_partial_header_block_gets_408_and_is_closed(server):
    with raw_connect(server) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        data = read_until_closed(s)
        elapsed = time.monotonic() - t0
    assert_408(data, "headers")
    assert HEADER_S * 0.9 < elapsed < HEADER_S + SLACK_S


def test_slowloris_is_cut_off(server):
    """One header byte every 0.2 s: the header clock is not restarted by each byte."""
    trickle = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
    with raw_connect(server) as s:
        t0, data, sent = time.monotonic(), b"", 0
        while time.monotonic() - t0 < HEADER_S + SLACK_S:
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:  # the answer came: stop sending, read it to the end
                data = read_until_closed(s)
                break
            s.sendall(trickle[sent:sent + 1])
            sent += 1
        elapsed = time.monotonic() - t0
    assert_408(data, "headers")
    assert elapsed < HEADER_S + SLACK_S
    assert sent < len(trickle)  # cut off mid-header, long before the trickle would have ended


def test_normal_and_keep_alive_requests_are_served(server):
    with raw_connect(server) as s:
        f = s.makefile("rb")
        for pause in (0.0, HEADER_S * 1.3):  # an idle keep-alive gap longer than the header timeout
            time.sleep(pause)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while (line := f.readline()) not in (b"\r\n", b""):
                head += line
            status, headers, _ = parse_response(head)
            assert status == 200, head
            assert json.loads(f.read(int(headers["content-length"])))
            assert headers.get("connection") != "close"


def test_headers_completed_in_time_are_answered(server):
    """The head in pieces over about half the header timeout: served normally."""
    with raw_connect(server) as s:
        for piece in (b"GET /hea", b"lthz HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n", b"\r\n"):
            s.sendall(piece)
            time.sleep(HEADER_S / 8)
        status, _, body = parse_response(read_until_closed(s))
    assert status == 200 and json.loads(body)


def test_stalled_body_gets_408_and_is_closed(server):
    with raw_connect(server) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"inputs\": [")
        data = read_until_closed(s)
        elapsed = time.monotonic() - t0
    assert_408(data, "body")
    assert 0.9 < elapsed < 1.0 + SLACK_S
