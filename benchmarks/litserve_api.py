"""The LitServe comparison: the served detector behind a small ``LitAPI`` (``pip install -e ".[bench]"``).

:data:`LITSERVE` is the ``litserve`` module, or None when it is not installed.
:class:`GGALitAPI` decodes the same ``.npy``/JSON bodies with the service's decoders,
calls the same detector's ``score`` on the batch and returns the service's response rows;
:func:`litserve_main` is the entry of its server process.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import numpy as np

from benchmarks.ceiling import served_detector

try:  # LitServe is a benchmark-only extra (pip install -e ".[bench]")
    import litserve as LITSERVE
except ImportError:  # pragma: no cover - depends on the environment
    LITSERVE = None


async def _raw_body(request) -> tuple[str, bytes]:
    """FastAPI dependency of the LitServe endpoint: (media type, raw body), decoded in the worker."""
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower(), await request.body()


if LITSERVE is not None:
    from fastapi import Depends, Request

    _raw_body.__annotations__["request"] = Request

    class GGALitAPI(LITSERVE.LitAPI):
        """The served detector behind LitServe: the service's decoders, ``detector.score`` on the
        batch, the service's response rows."""

        def __init__(self, threads: int, strategy: dict | None, **kwargs) -> None:
            super().__init__(**kwargs)
            self.threads, self.strategy_dict = threads, strategy

        def setup(self, device) -> None:
            import torch
            from prometheus_client import CollectorRegistry

            from service.artifacts import BUNDLED_VERSION
            from service.metrics import ServiceMetrics
            from service.worker import DetectorSlot, PredictWorker

            self.detector, self.card, self.device, settings = served_detector(self.threads, self.strategy_dict)
            self.version = BUNDLED_VERSION
            self.alpha = settings.model.alpha if settings.model.alpha is not None else self.detector.alpha
            self.rows_of = PredictWorker(DetectorSlot(self.detector, self.version), self.card,
                                         ServiceMetrics(CollectorRegistry()), self.device, settings.model.alpha)._rows
            self.detector.score(torch.zeros((1, *self.card.input_shape), device=self.device))

        def decode_request(self, request, **kwargs):
            from service.decode import decode_json_inputs, decode_npy, parse_json_body

            ctype, body = request
            if ctype == "application/json":
                return decode_json_inputs(parse_json_body(body), self.card.input_shape)
            return decode_npy(body, self.card.input_shape)

        def batch(self, inputs):
            return inputs

        def predict(self, xs):
            import torch

            out = self.detector.score(torch.from_numpy(np.concatenate(xs)).to(self.device))
            rows = self.rows_of(out, self.version, self.alpha)
            parts, start = [], 0
            for x in xs:
                parts.append(rows[start:start + len(x)])
                start += len(x)
            return parts

        def unbatch(self, output):
            return output

        def encode_response(self, output, **kwargs):
            return {"model": self.card.name, "alpha": self.alpha, "predictions": output}

    # LitServe builds its endpoint from this annotation: the raw body, not request.json()
    GGALitAPI.decode_request.__annotations__["request"] = Annotated[tuple, Depends(_raw_body)]


def litserve_main() -> None:
    """Entry of the LitServe server process: JSON arguments on argv[1]."""
    args = json.loads(sys.argv[1])
    api = GGALitAPI(args["threads"], args["strategy"], max_batch_size=args["max_batch_size"],
                    batch_timeout=args["batch_timeout_s"])
    server = LITSERVE.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=args["timeout_s"],
                           fast_queue=args["fast_queue"])
    server.run(host="127.0.0.1", port=args["port"], num_api_servers=1, generate_client_file=False,
               log_level="warning")
