"""``gga-serve``: start the service with uvicorn.

Settings come from ``GGA_*`` environment variables; ``--host``/``--port`` override
them. With no configuration it serves the bundled reference MNIST CNN and its detector.
The server is started through uvicorn's public API (``uvicorn.Config``, ``uvicorn.Server``);
only ``GGA_GUARDED_PROTOCOL=true`` swaps in the service's own h11 protocol (:mod:`service.protocol`).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from service.app import create_app
from service.server import DrainingServer
from service.settings import Settings, SettingsError

EXIT_STARTUP_FAILED = 3  # the lifespan failed (no model, a broken detector), as uvicorn.run exits then
EXIT_BAD_SETTINGS = 2


def server_config(app, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration of ``settings``: documented ``uvicorn.Config`` parameters only, the h11
    implementation and the standard asyncio event loop (the ones the service is tested with, also where
    uvloop/httptools are installed, e.g. by the ``oip`` extra's kserve client)."""
    http: str | type = "h11"
    if settings.server.guarded_protocol:
        from service.protocol import guarded_protocol

        http = guarded_protocol(settings, app)  # header timeout, shedding before parsing
    return uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                          log_level=settings.server.log_level, http=http, loop="asyncio",
                          timeout_graceful_shutdown=settings.server.shutdown_grace_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gga-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="bind address (GGA_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (GGA_PORT, default 8000)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except SettingsError as exc:
        print(f"gga-serve: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_SETTINGS)
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = DrainingServer(server_config(app, settings), app)  # SIGTERM: stop admitting, drain, 503 what is left
    server.run()
    if not server.started:  # the lifespan failed (no model, bad settings): as uvicorn.run does
        sys.exit(EXIT_STARTUP_FAILED)


if __name__ == "__main__":
    main()
