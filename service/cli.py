"""``gga-serve``: start the service with uvicorn.

Settings come from ``GGA_*`` environment variables; ``--host``/``--port`` override
them. With no configuration it serves the bundled reference MNIST CNN and its detector.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from uvicorn.server import STARTUP_FAILURE

from service.app import create_app
from service.protocol import slow_client_protocol
from service.server import DrainingServer
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gga-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="bind address (GGA_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (GGA_PORT, default 8000)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s,
                            http=slow_client_protocol(settings, app))  # read timeouts, shedding before parsing
    server = DrainingServer(config, app)  # SIGTERM: stop admitting, drain the queue, 503 for what is left
    server.run()
    if not server.started:  # the lifespan failed (no model, bad settings): as uvicorn.run does
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
