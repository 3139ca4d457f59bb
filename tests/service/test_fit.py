"""POST /fit and GET /fit/{id}: auth, jobs, atomic swap, persistence, failures."""

from __future__ import annotations

import asyncio
import io

import numpy as np

from detectors.datasets import load_idx_split
from service.settings import DEFAULT_MODEL_DIR
from tests.support import fakes
from tests.support.service import MNIST, Running, make_settings, run

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _train_sample(n=400):
    x, y = load_idx_split(MNIST, "train")
    idx = np.random.default_rng(5).choice(len(x), n, replace=False)
    return x[idx], y[idx]


async def _wait(svc, job_id, timeout=120.0):
    for _ in range(int(timeout / 0.05)):
        r = await svc.client.get(f"/fit/{job_id}", headers=AUTH)
        job = r.json()
        if job["state"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"fit job {job_id} did not finish: {job}")


def test_fit_refused_without_token_configured(tmp_path):
    async def go():
        async with Running(make_settings(tmp_path)) as svc:
            return await svc.client.post("/fit", files={"file": ("d.npz", b"x")})

    r = run(go())
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "fit_disabled"
    assert "GGA_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_fit_job_lifecycle(tmp_path, mnist_test):
    x, y = _train_sample()
    settings = make_settings(tmp_path, admin_token=TOKEN, model="factory:tests.support.fakes:gated_mnist",
                             model_weights=DEFAULT_MODEL_DIR / "model.safetensors", data_dir=tmp_path / "data")
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "small.npz", x=x[:200], y=y[:200])
    np.savez(tmp_path / "outside.npz", x=x[:200], y=y[:200])
    probe = mnist_test[0][:4]

    async def go():
        async with Running(settings) as svc:
            c = svc.client
            upload = {"file": ("train.npz", _npz(x=x, y=y), "application/octet-stream")}
            assert (await c.post("/fit", files=upload)).status_code == 401
            wrong = await c.post("/fit", files=upload, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
            assert (await c.get("/fit/abc")).status_code == 401
            # bad uploads: 4xx, nothing starts
            bad = [
                ({"file": ("a.npz", _npz(x=x), "application/octet-stream")}, 422),
                ({"file": ("a.npz", b"not a zip", "application/octet-stream")}, 400),
                ({"file": ("a.npz", _npz(x=x[:, 0], y=y), "application/octet-stream")}, 422),
                ({"file": ("a.npz", _npz(x=x, y=y + 10), "application/octet-stream")}, 422),
                ({"file": ("a.npz", _npz(x=x, y=y[:10]), "application/octet-stream")}, 422),
                ({"file": ("a.npz", _npz(x=(x * 255).astype(np.uint8), y=y), "application/octet-stream")}, 422),
                ({"file": ("a.npz", _npz(x=x, y=y, x_cal=x), "application/octet-stream")}, 422),
                ({"file": ("a.npz", _npz(x=x, y=y, x_cal=x, y_cal=y[:5]), "application/octet-stream")}, 422),
            ]
            for files, status in bad:
                r = await c.post("/fit", files=files, headers=AUTH)
                assert r.status_code == status, r.text
                assert set(r.json()["error"]) == {"type", "message"}
            assert (await c.get("/info")).json()["detector_version"] == "v0"
            before = (await c.post("/predict", json={"inputs": probe.tolist()})).json()["predictions"]

            # a job that holds the model: a second one gets 409
            fakes.FORWARDS.clear()
            fakes.GATE.clear()
            try:
                r = await c.post("/fit", files=upload, headers=AUTH)
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                assert r.headers["location"] == f"/fit/{job_id}"
                second = await c.post("/fit", files=upload, headers=AUTH)
                assert second.status_code == 409 and job_id in second.json()["error"]["message"]
                running = (await c.get(f"/fit/{job_id}", headers=AUTH)).json()
                assert running["state"] == "running" and running["phase"] == "features"
                assert running["progress"] == {"done": 0, "total": 400}
            finally:
                fakes.GATE.set()
            job = await _wait(svc, job_id)
            assert job["state"] == "succeeded", job
            # every model pass of the fit ran on the compute worker, between request batches, in batches of at
            # most GGA_MAX_BATCH_ROWS (64): 400 rows = 7 passes, each its forward and its probe of the layers
            threads = {name for name, _ in fakes.FORWARDS}
            assert threads == {"gga-worker"}, threads
            assert max(rows for _, rows in fakes.FORWARDS) == 64
            res = job["result"]
            assert res["version"] == "v1" and job["progress"] == {"done": 400, "total": 400}
            assert res["n_samples"] == 400
            assert res["n_correct"] == round(res["model_accuracy"] * 400)
            # the default preset (GGA_DETECTOR) is the composite: 20% of the 400 samples held out to calibrate
            assert (res["kind"], res["preset"], res["n_calibration"]) == ("composite", "composite", 80)
            assert res["components"][:3] == ["gga", "margin", "energy"]
            info = (await c.get("/info")).json()
            assert info["detector_version"] == "v1" and info["detector"]["fit"]["n_samples"] == 400
            assert info["detector"]["preset"] == "composite" and info["detector"]["components"] == res["components"]
            after = (await c.post("/predict", json={"inputs": probe.tolist()})).json()["predictions"]
            assert {p["detector_version"] for p in after} == {"v1"}
            assert [p["label"] for p in after] == [p["label"] for p in before]

            # a job on data the model gets wrong fails; v1 keeps serving
            r = await c.post("/fit", files={"file": ("b.npz", _npz(x=x, y=(y + 1) % 10))}, headers=AUTH)
            failed = await _wait(svc, r.json()["id"])
            assert failed["state"] == "failed" and "correctly classified" in failed["error"]
            assert failed["result"] is None
            assert (await c.get("/info")).json()["detector_version"] == "v1"
            again = (await c.post("/predict", json={"inputs": probe.tolist()})).json()["predictions"]
            assert again == after

            # server-side paths: only inside GGA_DATA_DIR
            r = await c.post("/fit", json={"path": "../outside.npz"}, headers=AUTH)
            assert r.status_code == 403
            r = await c.post("/fit", json={"path": "missing.npz"}, headers=AUTH)
            assert r.status_code == 404
            m = await svc.metrics()
            return after, m

    after, m = run(go())
    assert m[("gga_fit_jobs_total", (("state", "succeeded"),))] == 1
    assert m[("gga_fit_jobs_total", (("state", "failed"),))] == 1
    assert m[("gga_detector_info", (("version", "v1"),))] == 1
    assert ("gga_detector_info", (("version", "v0"),)) not in m
    versions = sorted(p.name for p in (tmp_path / "artifacts").glob("*/*"))
    assert versions == ["v0001"]  # the failed job left nothing behind

    async def restart():
        async with Running(settings) as svc:
            info = (await svc.client.get("/info")).json()
            preds = (await svc.client.post("/predict", json={"inputs": probe.tolist()})).json()["predictions"]
            return info, preds

    info, preds = run(restart())
    assert info["detector_version"] == "v1"
    assert preds == after  # bit-identical after the restart


def test_fit_from_data_dir_path(tmp_path):
    x, y = _train_sample(260)
    (tmp_path / "data").mkdir()
    y_cal = y[200:].copy()
    y_cal[:5] = (y_cal[:5] + 1) % 10  # 5 calibration labels the model cannot match
    np.savez(tmp_path / "data" / "small.npz", x=x[:200], y=y[:200], x_cal=x[200:], y_cal=y_cal)
    settings = make_settings(tmp_path, admin_token=TOKEN, data_dir=tmp_path / "data", top_n=4)

    async def go():
        async with Running(settings) as svc:
            r = await svc.client.post("/fit", json={"path": "small.npz", "preset": "gga"}, headers=AUTH)
            assert r.status_code == 202, r.text
            job = await _wait(svc, r.json()["id"])
            preds = (await svc.client.post("/predict", json={"inputs": x[:2].tolist(), "return_csm": True}))
            bad = [await svc.client.post("/fit", json={"path": "small.npz", **opt}, headers=AUTH)
                   for opt in ({"preset": "best"}, {"top_n": 2}, {"top_n": 11}, {"alpha": 1.5}, {"alpha": "x"})]
            r = await svc.client.post("/fit", json={"path": "small.npz", "alpha": 0.1}, headers=AUTH)
            composite = await _wait(svc, r.json()["id"])
            r = await svc.client.post("/fit", files={"file": ("s.npz", (tmp_path / "data" / "small.npz").read_bytes())},
                                      data={"preset": "paper", "top_n": "all"}, headers=AUTH)
            assert r.status_code == 202, r.text
            paper = await _wait(svc, r.json()["id"])
            assert paper["state"] == "succeeded" and paper["result"]["config"]["top_n"] == 10
            return job, preds.json(), bad, composite

    job, preds, bad, composite = run(go())
    assert [(b.status_code, b.json()["error"]["type"]) for b in bad] == [(422, "invalid_option")] * 5
    assert "top_n must be between 3 and the model's 10 classes" in bad[2].json()["error"]["message"]
    assert job["state"] == "succeeded" and job["result"]["config"]["top_n"] == 4
    assert (job["result"]["kind"], job["result"]["preset"]) == ("gga", "gga")
    # the composite calibrates on every held-out sample (the trust is a p-value for "in-distribution input")
    assert composite["state"] == "succeeded", composite
    c = composite["result"]
    assert (c["preset"], c["n_calibration"], c["config"]["alpha"], c["config"]["top_n"]) == ("composite", 60, 0.1, 4)
    res = job["result"]
    assert res["n_samples"] == 260 and job["progress"] == {"done": 260, "total": 260}
    assert res["n_calibration"] == 55 and res["n_fit"] == res["n_correct"] - 55
    assert np.array(preds["predictions"][0]["csm"]).shape == (4, 4)
