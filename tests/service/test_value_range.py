"""The model card's value range: the 0..255 mistake gets a clear answer, not a silent 200."""

from __future__ import annotations

import json

import numpy as np

from service.settings import DEFAULT_MODEL_DIR
from tests.support.service import Running, make_settings, npy_bytes, run

NPY = {"content-type": "application/x-npy"}


def _card(tmp_path, **changes):
    card = json.loads((DEFAULT_MODEL_DIR / "model_card.json").read_text())
    card.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        card.pop(key)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    return path


def test_pixels_on_the_wrong_scale(tmp_path, mnist_test):
    x = mnist_test[0][:3]
    raw = (x * 255).astype(np.float32)  # the classic mistake: 0..255 instead of [0, 1]
    mixed = np.concatenate([x[:1], raw[1:2], x[2:3]])

    async def go(settings):
        async with Running(settings) as svc:
            r = await svc.client.post("/predict", content=npy_bytes(mixed), headers=NPY)
            ok = await svc.client.post("/predict", json={"inputs": x.tolist()})
            return r, ok, await svc.metrics()

    r, ok, m = run(go(make_settings(tmp_path)))
    assert r.status_code == 422 and r.json()["error"]["type"] == "out_of_range"
    msg = r.json()["error"]["message"]
    assert msg.startswith("sample 1 has values in [0, 255]") and "[0, 1]" in msg and "divided by 255" in msg
    assert ok.status_code == 200 and "warnings" not in ok.json()
    assert m[("gga_rows_total", ())] == 3  # the refused request was not computed

    # policy "warn": served, with a warning per out-of-range sample (and the detector flags them)
    r, ok, m = run(go(make_settings(tmp_path, model_card=_card(tmp_path, value_range_policy="warn"))))
    assert r.status_code == 200
    body = r.json()
    assert [w["sample"] for w in body["warnings"]] == [1]
    assert "outside the model's range [0, 1]" in body["warnings"][0]["message"]
    assert body["predictions"][1]["flagged"] is True


def test_without_a_range_an_overflow_inside_the_model_is_a_422(tmp_path):
    x = np.concatenate([np.zeros((1, 1, 28, 28), np.float32), np.full((1, 1, 28, 28), 3e38, np.float32)])

    async def go():
        async with Running(make_settings(tmp_path, model_card=_card(tmp_path, value_range=None,
                                                                    value_range_policy=None))) as svc:
            r = await svc.client.post("/predict", content=npy_bytes(x), headers=NPY)
            after = await svc.client.post("/predict", content=npy_bytes(x[:1]), headers=NPY)
            return r, after

    r, after = run(go())
    assert r.status_code == 422 and r.json()["error"]["type"] == "non_finite_output"
    assert "sample(s) 1" in r.json()["error"]["message"]
    assert after.status_code == 200
