"""Shedding against a real server: while the queue admits nothing, a new ``POST /predict`` gets 503
before routing, before its body is read (the request middleware, plain uvicorn, the default), or the
prepared 503 from the guarded protocol before parsing (``GGA_GUARDED_PROTOCOL=true``); probes are
served, and the refusal is counted."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import time

import numpy as np
import pytest

from benchmarks.serverproc import start_server, stop_server
from service.protocol import SHED_RESPONSE
from tests.support.fakes import slow_server_env
from tests.support.service import parse_metrics


def _request(base: str, raw: bytes) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(raw)
    return s


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks)


def _predict(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    body = buf.getvalue()
    return (b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize("guarded", [False, True], ids=["asgi", "guarded-protocol"])
def test_predict_is_shed_before_its_body_is_read_while_the_queue_is_full(tmp_path, mnist_test, guarded) -> None:
    env = slow_server_env(tmp_path, 1.0, GGA_MAX_QUEUE_ROWS="1", GGA_GUARDED_PROTOCOL=str(guarded).lower())
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        raw = _predict(mnist_test[0][:1])
        computing = _request(base, raw)
        time.sleep(0.3)
        queued = _request(base, raw)  # the one row the queue holds
        time.sleep(0.3)
        shed = _read_all(_request(base, raw))
        health = _read_all(_request(base, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
        answers = [_read_all(computing), _read_all(queued)]
        metrics = _read_all(_request(base, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
    finally:
        out = stop_server(proc)
    if guarded:
        assert shed == SHED_RESPONSE
        assert shed.endswith(b'{"error":{"type":"overloaded","message":"the queue is full; retry later"}}')
    else:
        head, body = shed.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert lines[0] == "HTTP/1.1 503 Service Unavailable" and headers["retry-after"] == "1", head
        error = json.loads(body)["error"]
        assert error["type"] == "overloaded", error
        assert re.fullmatch(r"the queue is full \((1 of 1 rows queued|estimated wait \d+\.\d s)\); retry later",
                            error["message"]), error
    assert health.startswith(b"HTTP/1.1 200 ")
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 2
    m = parse_metrics(metrics.split(b"\r\n\r\n", 1)[1].decode())
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "503")))] == 1
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "200")))] == 2
    assert "Traceback" not in out, out
