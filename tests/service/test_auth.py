"""Tokens: the optional read token of /info and the docs, and the helpers shared with /fit's admin token."""

from __future__ import annotations

import base64

from service.auth import matches, presented
from tests.support.service import Running, make_settings, run

READER = ("/info", "/docs", "/redoc", "/openapi.json")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_presented_and_matches() -> None:
    assert presented("Bearer abc") == b"abc"
    assert presented("bearer  abc ") == b"abc"
    assert presented("Bearer") is None and presented("") is None and presented("Token abc") is None
    assert presented(basic("u", "abc")) is None  # Basic only where asked for
    assert presented(basic("u", "abc"), basic=True) == b"abc"
    assert presented(basic("", "p:q"), basic=True) == b"p:q"  # the password may hold colons
    assert presented(basic("u", ""), basic=True) is None
    assert presented("Basic %%%", basic=True) is None  # not base64
    assert presented("Basic " + base64.b64encode(b"no-colon").decode(), basic=True) is None
    assert presented("Bearer caf\xe9") == "café".encode("latin-1")  # the raw bytes that were sent
    assert matches(b"abc", "x", "abc") and not matches(b"abc", "abd") and not matches(b"abc", "", "")
    assert not matches(None, "abc") and not matches(b"", "")
    assert matches("café".encode(), "café")  # tokens are UTF-8


def test_read_token_guards_info_and_docs_only(tmp_path) -> None:
    settings = make_settings(tmp_path, read_token="reader-1", admin_token="admin-1")

    async def go():
        async with Running(settings) as svc:
            c = svc.client
            out = {
                "none": [await c.get(p) for p in READER],
                "reader": [await c.get(p, headers={"authorization": "Bearer reader-1"}) for p in READER],
                "admin": [await c.get(p, headers={"authorization": "Bearer admin-1"}) for p in READER],
                "basic": [await c.get(p, headers={"authorization": basic("me", "reader-1")}) for p in READER],
                "wrong": [await c.get(p, headers={"authorization": "Bearer reader-2"}) for p in READER],
                "open": [await c.get(p) for p in ("/healthz", "/readyz", "/metrics", "/docs-static/swagger-ui.css")],
                "fit_by_reader": await c.post("/fit", json={"path": "x.npz"},
                                              headers={"authorization": "Bearer reader-1"}),
            }
            return out, await svc.metrics()

    out, m = run(go())
    for r in out["none"] + out["wrong"]:
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "unauthorized"
        assert r.headers["www-authenticate"] == 'Basic realm="GGA trust service", Bearer'
    for key in ("reader", "admin", "basic"):
        assert [r.status_code for r in out[key]] == [200, 200, 200, 200], key
    assert out["reader"][0].json()["model"] == "mnist_cnn"
    assert [r.status_code for r in out["open"]] == [200, 200, 200, 200]
    assert out["fit_by_reader"].status_code == 401  # the read token does not open /fit
    assert m[("gga_requests_total", (("route", "/info"), ("status", "401")))] == 2
    assert m[("gga_requests_total", (("route", "/openapi.json"), ("status", "401")))] == 2


def test_blank_read_token_leaves_info_open(tmp_path) -> None:
    settings = make_settings(tmp_path, read_token="  ")
    assert settings.auth.read_token is None

    async def go():
        async with Running(settings) as svc:
            return [(await svc.client.get(p)).status_code for p in READER]

    assert run(go()) == [200, 200, 200, 200]
