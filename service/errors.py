"""One error envelope for every failure: ``{"error": {"type": ..., "message": ...}}``.

:class:`ApiError` (and Starlette's HTTP errors, and request validation errors) answer
their 4xx/5xx; :func:`internal_error` is the one catch-all for everything else: a 500
``internal`` envelope with an error id, the traceback logged server-side only.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

log = logging.getLogger("service.errors")

_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_input",
          500: "internal", 503: "unavailable", 504: "timeout"}


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def envelope(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def internal_error(scope: Scope, exc: BaseException) -> JSONResponse:
    """The answer to an unhandled exception: logged with its traceback and an error id; the
    client gets only the id (no exception text, no traceback)."""
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled %s in %s %s (error id %s)", type(exc).__name__, scope.get("method", "?"),
              scope.get("path", "?"), error_id, exc_info=exc)
    return envelope(500, "internal", f"internal server error (error id {error_id}); the details are in the "
                    "server log")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return envelope(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return envelope(exc.status_code, _TYPES.get(exc.status_code, "error"), str(exc.detail),
                        getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return envelope(422, "invalid_input", "; ".join(parts) or "invalid request")

    # Backstop only: the request middleware of create_app answers unhandled exceptions
    # itself (counted, connection kept); this covers a failure in the middleware stack.
    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request.scope, exc)
