"""Docs that work anywhere: /docs and /redoc without a CDN, an artifact directory that does not
depend on the folder the server is started from."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from service.settings import Settings
from tests.support.service import Running, make_settings, run

ASSET_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def test_docs_pages_load_their_assets_from_the_service(tmp_path):
    async def go():
        async with Running(make_settings(tmp_path)) as svc:
            pages = {url: await svc.client.get(url) for url in ("/docs", "/redoc")}
            assets = {}
            for page in pages.values():
                for url in ASSET_URL.findall(page.text):
                    assets[url] = await svc.client.get(url)
            return pages, assets, await svc.client.get("/openapi.json")

    pages, assets, schema = run(go())
    for url, page in pages.items():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), url
        # no URL to another host: nothing for a browser to fetch off this machine (FastAPI's own pages
        # load Swagger UI / ReDoc from a CDN and Google fonts)
        assert "http" not in page.text, url
        assert all(u.startswith("/") and not u.startswith("//") for u in ASSET_URL.findall(page.text)), url
        assert "/openapi.json" in page.text
    swagger_urls = ASSET_URL.findall(pages["/docs"].text)
    kinds = {Path(u).suffix for u in swagger_urls}
    assert {".js", ".css"} <= kinds, swagger_urls
    assert {Path(u).suffix for u in ASSET_URL.findall(pages["/redoc"].text)} >= {".js"}
    for url, r in assets.items():
        assert url.startswith("/docs-static/"), url
        assert r.status_code == 200 and len(r.content) > 1000, (url, r.status_code, len(r.content))
        if url.endswith(".js"):
            assert "javascript" in r.headers["content-type"], (url, r.headers["content-type"])
        elif url.endswith(".css"):
            assert r.headers["content-type"].startswith("text/css"), url
    # the bundles are the ones that render the OpenAPI 3.1 schema FastAPI writes (Swagger UI 5, ReDoc 2)
    assert schema.json()["openapi"].startswith("3.1")
    assert b"isOAS31" in assets["/docs-static/swagger-ui-bundle.js"].content
    # the pages are not part of the API schema
    assert not {"/docs", "/redoc"} & set(schema.json()["paths"])


def test_artifact_dir_is_absolute_logged_and_shown_in_info(tmp_path, monkeypatch, caplog):
    started_in = tmp_path / "started-here"
    elsewhere = tmp_path / "elsewhere"
    started_in.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(started_in)
    assert Settings(_env_file=None).storage.artifact_dir == started_in.resolve() / "artifacts"  # the default
    monkeypatch.setenv("GGA_ARTIFACT_DIR", "store/v")
    assert Settings(_env_file=None).storage.artifact_dir == started_in.resolve() / "store" / "v"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GGA_ARTIFACT_DIR", "~/home-store")
    assert Settings(_env_file=None).storage.artifact_dir == tmp_path.resolve() / "home-store"
    monkeypatch.delenv("GGA_ARTIFACT_DIR")

    settings = make_settings(tmp_path, artifact_dir="relative-store")
    expected = started_in.resolve() / "relative-store"
    assert settings.storage.artifact_dir == expected and settings.storage.artifact_dir.is_absolute()
    monkeypatch.chdir(elsewhere)  # the working directory changes after the settings are built: no effect

    async def go():
        async with Running(settings) as svc:
            return (await svc.client.get("/info")).json()

    with caplog.at_level(logging.INFO, logger="service"):
        info = run(go())
    assert info["artifact_dir"] == str(expected)
    lines = [r.getMessage() for r in caplog.records if r.name == "service" and "artifact directory" in r.getMessage()]
    assert lines == [f"artifact directory {expected}"]
    assert not (elsewhere / "relative-store").exists()
