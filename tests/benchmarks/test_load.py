"""``python -m benchmarks.load --quick``: the whole command end to end, plus its client and report pieces."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks import loadgen
from benchmarks.litserve_api import LITSERVE

ROOT = Path(__file__).resolve().parents[2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        body = b'{"status": "ok"}'
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\n\r\n")
            return
        self.send_response(503 if self.path == "/busy" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        body = self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the open loop opens 64 connections at once


@pytest.fixture
def echo_server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_client_speaks_keep_alive_http(echo_server):
    port = echo_server

    async def go():
        c = await loadgen.Conn.open("127.0.0.1", port)
        got = [await c.request(loadgen.http_request("127.0.0.1", port, "POST", "/x", b"abc", "text/plain")),
               await c.request(loadgen.http_request("127.0.0.1", port, "GET", "/chunked")),
               await c.request(loadgen.http_request("127.0.0.1", port, "GET", "/busy"))]
        c.close()
        return got

    assert asyncio.run(go()) == [(200, b"abc"), (200, b"hello"), (503, b'{"status": "ok"}')]


def test_closed_and_open_loop_count_every_request(echo_server):
    port = echo_server
    bodies = [loadgen.http_request("127.0.0.1", port, "GET", p) for p in ("/a", "/busy")]
    closed = asyncio.run(loadgen.closed_loop("127.0.0.1", port, bodies, 4, 0.05, 0.3, 1))
    assert closed["requests"] == sum(closed["statuses"].values()) > 0
    assert set(closed["statuses"]) == {"200", "503"}
    opened = asyncio.run(loadgen.open_loop("127.0.0.1", port, bodies, 200.0, 0.3, 1, 5.0, 1000.0, seed=0))
    assert opened["sent"] == sum(opened["statuses"].values()) > 20
    assert set(opened["latency_by_status"]) == {"200", "503"} and opened["unanswered"] == 0
    assert opened["goodput_rows_per_s"] <= opened["sent_per_s"]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The command as a user runs it (quick mode): real servers, every section in the JSON and
    markdown, every server stopped afterwards."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.load", "--quick", "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads((tmp_path / "load.json").read_text())
    md = (tmp_path / "load.md").read_text()
    assert out["settings"]["quick"] and out["git"]["commit"] and out["machine"]["torch"]
    assert out["ceiling"]["batches"]["64"]["rows_per_s"] > 0 and out["ceiling"]["threads"] == 1
    assert set(out["client_overhead"]) == {"1", "8"}
    for fmt in ("npy", "json"):  # the alternating one-serial-client comparison
        assert set(out["serial"]["formats"][fmt]) == {"default", "batch1"}
        assert all(r["requests"] > 0 for r in out["serial"]["formats"][fmt].values())
    for label, cfg in out["configs"].items():
        assert cfg["batching"]["max_batch_rows"] == (64 if label == "default" else 1)
        for fmt in ("npy", "json"):
            for c in ("1", "8"):
                point = cfg["closed"][fmt][c]
                assert point["statuses"].get("200", 0) > 0 and point["rows_per_s"] > 0, (label, fmt, c)
            (opened,) = cfg["open"][fmt]
            assert opened["multiple"] == 2.0 and opened["sent"] == sum(opened["statuses"].values())
    assert set(out["configs"]) == {"default", "batch1"}
    lit = out["litserve"]
    if LITSERVE is None:
        assert "not installed" in lit["skipped"] and "LitServe: skipped" in md
    else:
        assert lit["closed"]["npy"]["1"]["statuses"].get("200", 0) > 0
    names = {t["target"] for t in out["targets"]}
    assert any("in-process ceiling" in n for n in names) and any("batching" in n for n in names)
    for heading in ("## In-process ceiling", "## Load client overhead", "## One serial client", "## Closed loop",
                    "## Open loop", "## Targets"):
        assert heading in md
    for port in [cfg["port"] for cfg in out["configs"].values()] + ([lit["port"]] if "port" in lit else []):
        with socket.socket() as s:  # stopped: nothing listens there any more
            assert s.connect_ex(("127.0.0.1", port)) != 0
