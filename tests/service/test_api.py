"""In-process tests of the HTTP contract (httpx ASGI transport with the lifespan)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from tests.support.service import Running, expected_rows, make_settings, npy_bytes, run


def _check_row(row: dict, exp: dict) -> None:
    assert row["label"] == exp["label"]
    assert row["label_name"] == str(exp["label"])
    assert [c["label"] for c in row["top_classes"]] == exp["top"]
    assert row["flagged"] == exp["flagged"]
    assert row["trust"] == pytest.approx(exp["trust"], abs=1e-12)
    # the layer activations (float sums inside the model) round differently in another batch: the raw
    # statistic agrees to float rounding, trust and flag exactly
    assert row["score"] == pytest.approx(exp["score"], rel=1e-5)
    assert row["confidence"] == pytest.approx(exp["confidence"], rel=1e-5)
    assert row["detector_version"] == "v0"


def test_predict_json_and_npy_equal_the_detector(tmp_path, mnist_test, reference):
    x = mnist_test[0][:5]
    noise = np.random.default_rng(0).uniform(0, 1, size=(3, 1, 28, 28)).astype(np.float32)
    batch = np.concatenate([x, noise])
    exp = expected_rows(reference, batch)

    async def go():
        async with Running(make_settings(tmp_path)) as svc:
            r = await svc.client.post("/predict", json={"inputs": batch.tolist()})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "mnist_cnn" and body["alpha"] == 0.05
            assert len(body["predictions"]) == 8
            for row, e in zip(body["predictions"], exp, strict=True):
                _check_row(row, e)
                assert "csm" not in row
            r2 = await svc.client.post("/predict?return_csm=true", content=npy_bytes(batch),
                                       headers={"content-type": "application/x-npy"})
            assert r2.status_code == 200, r2.text
            for row, e in zip(r2.json()["predictions"], exp, strict=True):
                _check_row(row, e)
                csm = np.array(row["csm"])
                assert csm.shape == (5, 5)  # the default detector analyses the top 5 classes
                np.testing.assert_array_equal(csm, csm.T)
            return body

    body = run(go())
    assert [p["label"] for p in body["predictions"][:5]] == mnist_test[1][:5].tolist()
    # uniform noise is flagged, the clean digits are not
    assert [p["flagged"] for p in body["predictions"]] == [e["flagged"] for e in exp]


def test_info_health_ready_and_openapi(tmp_path):
    async def go():
        async with Running(make_settings(tmp_path, max_batch_rows=32)) as svc:
            assert (await svc.client.get("/healthz")).json() == {"status": "ok"}
            assert (await svc.client.get("/readyz")).json() == {"status": "ready", "detector_version": "v0"}
            info = (await svc.client.get("/info")).json()
            assert info["model"] == "mnist_cnn" and info["input_shape"] == [1, 28, 28]
            assert info["class_names"] == [str(i) for i in range(10)]
            assert info["detector_version"] == "v0" and info["device"] == "cpu"
            assert info["batching"]["max_batch_rows"] == 32
            assert info["detector"]["fit"]["n_calibration"] == 4000  # the first 4,000 held-out validation images
            assert (info["detector"]["kind"], info["detector"]["preset"]) == ("composite", "composite")
            assert info["detector"]["components"] == ["gga", "margin", "energy", "layer:features.1",
                                                      "layer:features.3", "layer:features.6", "layer:features.8",
                                                      "layer:act", "disagreement"]
            assert info["detector"]["config"]["second_opinion"] == "robust_mnist_cnn"
            # what the adaptive suite measured on this fitted state (benchmarks/adaptive/attach.py), caveat included
            ev = info["detector"]["evaluation"]
            assert (ev["split"], ev["budgets"]["linf:0.3"]["n_correct"]) == ("test", 199)
            assert ev["budgets"]["linf:0.3"]["robust_detection"]["best_of_all"] == 1.0
            assert ev["budgets"]["l2:2.0"]["robust_detection"]["best_of_all"] == 0.6533  # 69 of 199 broken
            # the guided attack succeeds unbounded (the sanity check), CW from the clean input does not
            assert ev["sanity"]["attacks"]["guided"]["unbounded_success"] == 1.0 and "caveat" not in ev["sanity"]
            assert ev["sanity"]["attacks"]["cw"]["unbounded_success"] < 1.0 and "cw" in ev["sanity"]["note"]
            assert info["model_card"]["test_accuracy"] >= 0.99
            spec = (await svc.client.get("/openapi.json")).json()
            content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
            assert set(content) == {"application/json", "application/x-npy", "image/png", "image/jpeg", "image/webp",
                                    "multipart/form-data"}
            assert "422" in spec["paths"]["/predict"]["post"]["responses"]

    run(go())


BAD_REQUESTS = [
    # (description, kwargs for client.post, status, error type)
    ("wrong shape", {"json": {"inputs": [[[0.0] * 28] * 28]}}, 422, "invalid_shape"),
    ("empty list", {"json": {"inputs": []}}, 422, "empty_input"),
    ("ragged", {"json": {"inputs": [[[[0.0] * 28] * 28], [[[0.0] * 27] * 28]]}}, 422, "invalid_input"),
    ("strings", {"json": {"inputs": [[[["a"] * 28] * 28]]}}, 422, "invalid_input"),
    ("missing inputs", {"json": {"x": 1}}, 422, "invalid_input"),
    ("not an object", {"json": [1, 2]}, 422, "invalid_input"),
    ("bad return_csm", {"json": {"inputs": [[[[0.0] * 28] * 28]], "return_csm": "yes"}}, 422, "invalid_input"),
    ("malformed json", {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 400,
     "malformed_json"),
    ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
    ("text/plain", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("malformed npy", {"content": b"\x93NUMPY garbage", "headers": {"content-type": "application/x-npy"}}, 400,
     "malformed_npy"),
    ("int npy", {"content": npy_bytes(np.zeros((1, 1, 28, 28), np.int64)),
                 "headers": {"content-type": "application/x-npy"}}, 422, "invalid_dtype"),
    ("object npy", {"content": b"", "headers": {"content-type": "application/x-npy"}}, 400, "bad_request"),
    ("npy shape", {"content": npy_bytes(np.zeros((2, 28, 28), np.float32)),
                   "headers": {"content-type": "application/x-npy"}}, 422, "invalid_shape"),
    ("npy nan", {"content": npy_bytes(np.full((2, 1, 28, 28), np.nan, np.float32)),
                 "headers": {"content-type": "application/x-npy"}}, 422, "non_finite_input"),
    ("json inf", {"content": b'{"inputs": [[[' + b",".join([b"[" + b",".join([b"Infinity"] * 28) + b"]"] * 28)
                  + b"]]]}", "headers": {"content-type": "application/json"}}, 422, "non_finite_input"),
    ("too large", {"content": npy_bytes(np.zeros((400, 1, 28, 28), np.float32)),
                   "headers": {"content-type": "application/x-npy"}}, 413, "payload_too_large"),
]


def test_bad_inputs_get_4xx_envelope_and_change_nothing(tmp_path, mnist_test):
    x = mnist_test[0][:2]

    async def go():
        async with Running(make_settings(tmp_path, max_request_bytes=1024 * 1024)) as svc:
            before = (await svc.client.post("/predict", json={"inputs": x.tolist()})).json()
            m0 = await svc.metrics()
            for name, kwargs, status, etype in BAD_REQUESTS:
                r = await svc.client.post("/predict", **kwargs)
                assert r.status_code == status, (name, r.text)
                body = r.json()
                assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, name
                assert body["error"]["type"] == etype, (name, body)
                assert body["error"]["message"], name
            # a query-parameter validation error uses the same envelope
            r = await svc.client.post("/predict?return_csm=maybe", json={"inputs": x.tolist()})
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_input"
            assert "return_csm" in r.json()["error"]["message"]
            r = await svc.client.get("/nope")
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
            m1 = await svc.metrics()
            after = (await svc.client.post("/predict", json={"inputs": x.tolist()})).json()
            return before, after, m0, m1

    before, after, m0, m1 = run(go())
    assert before == after
    assert m1[("gga_rows_total", ())] == m0[("gga_rows_total", ())] == 2
    assert m1[("gga_detector_info", (("version", "v0"),))] == 1
    n422 = sum(1 for _, _, s, _ in BAD_REQUESTS if s == 422) + 1
    assert m1[("gga_requests_total", (("route", "/predict"), ("status", "422")))] == n422


def test_concurrent_burst_matches_single_sample_results(tmp_path, mnist_test, reference):
    x = mnist_test[0][:48]
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 1, size=(16, 1, 28, 28)).astype(np.float32)
    samples = np.concatenate([x, noise])
    exp = expected_rows(reference, samples)

    async def go():
        async with Running(make_settings(tmp_path, max_batch_rows=16, max_delay_ms=50)) as svc:
            async def one(i):
                if i % 2:
                    return await svc.client.post("/predict", json={"inputs": samples[i:i + 1].tolist()})
                return await svc.client.post("/predict", content=npy_bytes(samples[i:i + 1]),
                                             headers={"content-type": "application/x-npy"})

            responses = await asyncio.gather(*(one(i) for i in range(64)))
            return responses, await svc.metrics()

    responses, m = run(go())
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        (row,) = r.json()["predictions"]
        _check_row(row, exp[i])
    assert m[("gga_rows_total", ())] == 64
    assert m[("gga_batch_rows_sum", ())] == 64
    n_batches = m[("gga_batch_rows_count", ())]
    assert n_batches < 64  # batches held more than one row
    assert m[("gga_batches_total", ())] == n_batches
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "200")))] == 64
    assert m[("gga_flagged_total", ())] == sum(e["flagged"] for e in exp)


def test_large_request_is_split_across_batches(tmp_path, mnist_test, reference):
    x = mnist_test[0][:21]
    exp = expected_rows(reference, x)

    async def go():
        async with Running(make_settings(tmp_path, max_batch_rows=8)) as svc:
            r = await svc.client.post("/predict", content=npy_bytes(x), headers={"content-type": "application/x-npy"})
            return r, await svc.metrics()

    r, m = run(go())
    rows = r.json()["predictions"]
    assert len(rows) == 21
    for row, e in zip(rows, exp, strict=True):
        _check_row(row, e)
    assert m[("gga_batch_rows_count", ())] == 3  # 8 + 8 + 5
    assert m[("gga_batch_rows_sum", ())] == 21


def test_metrics_exact_after_known_traffic(tmp_path, mnist_test):
    x = mnist_test[0][:3]

    async def go():
        async with Running(make_settings(tmp_path)) as svc:
            flagged = 0
            for n in (1, 2, 3):
                r = await svc.client.post("/predict", json={"inputs": x[:n].tolist()})
                flagged += sum(p["flagged"] for p in r.json()["predictions"])
            await svc.client.post("/predict", content=b"{", headers={"content-type": "application/json"})
            await svc.client.get("/healthz")
            return flagged, await svc.metrics()

    flagged, m = run(go())
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "200")))] == 3
    assert m[("gga_requests_total", (("route", "/predict"), ("status", "400")))] == 1
    assert m[("gga_requests_total", (("route", "/healthz"), ("status", "200")))] == 1
    assert m[("gga_request_duration_seconds_count", (("route", "/predict"),))] == 4
    assert m[("gga_rows_total", ())] == 6
    assert m[("gga_trust_count", ())] == 6
    assert m[("gga_flagged_total", ())] == flagged
    assert m[("gga_queue_wait_seconds_count", ())] == 3
    assert m[("gga_batch_rows_sum", ())] == 6
    assert m[("gga_queue_rows", ())] == 0
    assert m[("gga_compute_seconds_count", (("stage", "forward"),))] == m[("gga_batches_total", ())]
    assert m[("gga_fit_jobs_total", (("state", "succeeded"),))] == 0
    assert json.dumps(m[("gga_detector_info", (("version", "v0"),))]) == "1.0"
