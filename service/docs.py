"""``/docs`` (Swagger UI) and ``/redoc`` served from the installed package, without a CDN.

FastAPI's own pages load their JS/CSS from a CDN and are blank off-line. The assets come
from the ``fastapi-offline`` package (MIT; it ships the Swagger UI 5 and ReDoc bundles,
which render the OpenAPI 3.1 schema FastAPI writes), mounted under :data:`STATIC_URL`;
the pages are FastAPI's own HTML with those local URLs. Only the files are used, not
that package's app factory.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs-static"
ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
SWAGGER_JS, SWAGGER_CSS = "swagger-ui-bundle.js", "swagger-ui.css"
REDOC_JS, FAVICON = "redoc.standalone.js", "favicon.png"


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Mount the assets and add the two pages (build the app with ``docs_url=None, redoc_url=None``)."""
    missing = [name for name in (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON) if not (ASSETS / name).is_file()]
    if missing:  # a fastapi-offline release that moved its files: fail at startup, not with a blank page
        raise RuntimeError(f"fastapi-offline ships no {', '.join(missing)} in {ASSETS}")
    app.mount(STATIC_URL, StaticFiles(directory=ASSETS), name="docs-static")

    def static(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{STATIC_URL}/{name}"

    def openapi_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url(request), title=f"{app.title} - Swagger UI",
            swagger_js_url=static(request, SWAGGER_JS), swagger_css_url=static(request, SWAGGER_CSS),
            swagger_favicon_url=static(request, FAVICON), swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url(request), title=f"{app.title} - ReDoc",
            redoc_js_url=static(request, REDOC_JS), redoc_favicon_url=static(request, FAVICON),
            with_google_fonts=False,
        )
