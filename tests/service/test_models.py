"""Three ways to name a model, and a second real model (CIFAR-10 ResNet56) end to end."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from detectors.datasets import load_cifar_npz
from detectors.zoo import MnistCNN, resnet56
from service.models import ModelLoadError, load_model, read_state_dict
from service.settings import DEFAULT_MODEL_DIR
from tests.support.service import Running, make_settings, run

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
RESNET56 = DATA / "cifar10_resnet" / "resnet56-4bfd9763.th"
TOKEN = "t"


def _mnist() -> MnistCNN:
    m = MnistCNN()
    m.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    return m.eval()


def test_torchscript_model_gets_a_composite_without_layers(tmp_path, mnist_test):
    """A TorchScript model hides its layers: the bundled composite (which reads them) is not used, and
    a composite fitted for it runs on GGA, the logit signals and the card's robust second opinion (which
    reads the input, not the model's layers)."""
    path = tmp_path / "mnist.pt"
    torch.jit.script(_mnist()).save(str(path))
    x = mnist_test[0][:4]

    xf, yf = mnist_test[0][:300], mnist_test[1][:300]
    buf = io.BytesIO()
    np.savez(buf, x=xf, y=yf)

    async def go(settings):
        async with Running(settings) as svc:
            info = (await svc.client.get("/info")).json()
            before = (await svc.client.get("/readyz")).status_code
            auth = {"authorization": "Bearer t0ken"}
            r = await svc.client.post("/fit", files={"file": ("f.npz", buf.getvalue())}, headers=auth)
            assert r.status_code == 202, r.text
            for _ in range(600):
                job = (await svc.client.get(r.headers["location"], headers=auth)).json()
                if job["state"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.05)
            preds = (await svc.client.post("/predict", json={"inputs": x.tolist()})).json()["predictions"]
            return info, before, job, preds

    ts_info, ready, job, ts = run(go(make_settings(tmp_path, model=f"torchscript:{path}", admin_token="t0ken",
                                                   model_card=DEFAULT_MODEL_DIR / "model_card.json")))
    assert ts_info["detector_version"] is None and ready == 503
    assert job["state"] == "succeeded", job
    assert job["result"]["components"] == ["gga", "margin", "energy", "disagreement"]
    assert [p["label"] for p in ts] == mnist_test[1][:4].tolist()
    assert {p["detector_version"] for p in ts} == {"v1"}
    with pytest.raises(ModelLoadError, match="needs a model card"):
        load_model(make_settings(tmp_path, model=f"torchscript:{path}"), torch.device("cpu"))


def test_model_loading_errors(tmp_path):
    cpu = torch.device("cpu")
    cases = [
        ({"model": "resnet1000"}, "unknown model"),
        ({"model": "cifar_resnet56"}, "has no bundled weights"),
        ({"model": "factory:tests.support.fakes:gated_mnist"}, "needs GGA_MODEL_WEIGHTS"),
        ({"model": "factory:tests.support.fakes"}, "package.module:function"),
        ({"model": "factory:no.such.module:f", "model_weights": tmp_path}, "cannot import"),
        ({"model": "torchscript:/nonexistent.pt"}, "does not exist"),
        ({"model": "mnist_cnn", "model_weights": RESNET56}, "do not fit the model"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ModelLoadError, match=msg):
            load_model(make_settings(tmp_path, **kwargs), cpu)
    # a whole pickled model is refused (weights_only=True), never unpickled
    pickled = tmp_path / "whole.pt"
    torch.save(MnistCNN(), pickled)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        read_state_dict(pickled)


def test_cifar_resnet56_checkpoint_accuracy_on_lossless_images():
    model = resnet56()
    model.load_state_dict(read_state_dict(RESNET56))
    model.eval()
    x, y = load_cifar_npz(DATA / "cifar10_lossless_subset" / "cifar10_data_batch_1_first4000.npz")
    with torch.no_grad():
        pred = model(torch.from_numpy(x[:200])).argmax(1).numpy()
    assert (pred == y[:200]).sum() == 200  # the data README reports 100.0% on all 4,000


def test_cifar_resnet56_served_end_to_end(tmp_path):
    x, y = load_cifar_npz(DATA / "cifar10_lossless_subset" / "cifar10_data_batch_1_first4000.npz")
    xt, _ = load_cifar_npz(DATA / "cifar10_jpeg_q75" / "cifar10_test_jpegq75.npz")
    probe = xt[::1250][:8]
    buf = io.BytesIO()
    np.savez(buf, x=x[:300], y=y[:300])
    settings = make_settings(tmp_path, model="cifar_resnet56", model_weights=RESNET56, admin_token=TOKEN, top_n=3,
                             fit_batch_size=100)

    async def go():
        async with Running(settings) as svc:
            c = svc.client
            ready = await c.get("/readyz")
            early = await c.post("/predict", json={"inputs": probe[:1].tolist()})
            info = (await c.get("/info")).json()
            r = await c.post("/fit", files={"file": ("c.npz", buf.getvalue())},
                             headers={"authorization": f"Bearer {TOKEN}"})
            job_id = r.json()["id"]
            for _ in range(2400):
                job = (await c.get(f"/fit/{job_id}", headers={"authorization": f"Bearer {TOKEN}"})).json()
                if job["state"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.05)
            preds = (await c.post("/predict", json={"inputs": probe.tolist()})).json()
            return ready, early, info, job, preds

    ready, early, info, job, preds = run(go())
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "no_detector"
    assert early.status_code == 503 and early.json()["error"]["type"] == "no_detector"
    assert info["input_shape"] == [3, 32, 32] and info["class_names"][0] == "airplane"
    assert job["state"] == "succeeded", job
    assert job["result"]["n_samples"] == 300 and job["result"]["n_correct"] == 300
    model = resnet56()
    model.load_state_dict(read_state_dict(RESNET56))
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(probe)).argmax(1).tolist()
    rows = preds["predictions"]
    assert [p["label"] for p in rows] == expected
    assert {p["detector_version"] for p in rows} == {"v1"}
    assert all(len(p["top_classes"]) == 3 for p in rows)
