"""Helpers of the service tests: settings for an in-process app, the app with its lifespan, metrics
parsing, npy bodies and what the detector computes for a sample alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings

MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


def make_settings(tmp_path: Path, **kw) -> Settings:
    """Settings for an in-process app; the strategy follows the device rule unless a test asks for
    the startup measurement (GGA_STRATEGY=auto, tested in test_strategy.py), which would add seconds
    to every app start here."""
    kw.setdefault("artifact_dir", tmp_path / "artifacts")
    kw.setdefault("strategy", "device")
    return Settings(_env_file=None, **kw)


class Running:
    """An app with its lifespan entered, and an httpx client on the ASGI transport."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.app = create_app(settings, registry=self.registry)

    async def __aenter__(self) -> Running:
        self._ctx = self.app.router.lifespan_context(self.app)
        await self._ctx.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()
        await self._ctx.__aexit__(None, None, None)

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        text = (await self.client.get("/metrics")).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def run(coro):
    return asyncio.run(coro)


def npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def expected_rows(reference, x: np.ndarray) -> list[dict]:
    """What the detector computes for each sample alone (batch of one)."""
    rows = []
    for i in range(len(x)):
        out = reference.score(torch.from_numpy(x[i:i + 1]))
        rows.append({"label": int(out.label[0]), "trust": float(out.trust[0]), "score": float(out.score[0]),
                     "flagged": bool(out.flagged[0]), "confidence": float(out.confidence[0]),
                     "top": out.top_classes[0, :5].tolist()})
    return rows
