"""The service's page at ``/``: send images (or a drawing) and see each verdict and its reasons.

Plain HTML, one script and one style sheet, shipped in the package (``service/static/page``)
and served by the service itself: no CDN, nothing fetched from elsewhere, works off-line.
The script calls ``/info`` and ``POST /predict?explain=true&return_csm=true`` on the
same origin. The page itself holds nothing about the deployment and is open; what it shows
comes from ``/info``, which stays behind the read token (``GGA_READ_TOKEN``). When ``/info``
answers 401 the page asks for the token in a password field, keeps it in the tab's
``sessionStorage`` (gone when the tab closes, never sent elsewhere) and sends it as
``Authorization: Bearer`` with its requests; a browser that already holds the token as
HTTP Basic credentials (from ``/docs``) sends those itself and is not asked.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).resolve().parent / "static" / "page"
ASSET_URL = "/ui"


def install_page(app: FastAPI) -> None:
    """``GET /`` (the page) and its assets under :data:`ASSET_URL`."""
    index = PAGE_DIR / "index.html"
    if not index.is_file():
        raise RuntimeError(f"the page's files are missing from the package: no {index}")
    app.mount(ASSET_URL, StaticFiles(directory=PAGE_DIR), name="page-assets")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
