"""The README's status codes of ``POST /predict``, walked against the service.

The "Status codes:" paragraph of the README's ``POST /predict`` section is parsed into one
segment per code; for each cause it names, a request that should produce it is sent to an
in-process app, and the answer's status and error type are checked. The codes the README
lists must be exactly the codes exercised here, and each cause's words must stand in its
code's segment, so that neither the README nor the service can change alone.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from service.settings import DEFAULT_MODEL_DIR, ENV_NAMES, Settings
from tests.support import fakes
from tests.support.service import Running, make_settings, npy_bytes, run

README = Path(__file__).resolve().parents[1] / "README.md"
JSON = {"content-type": "application/json"}
NPY = {"content-type": "application/x-npy"}
LIMIT_BYTES = 16 * 1024  # GGA_MAX_REQUEST_BYTES of the main app: one or two samples fit, eight do not


def status_segments(readme: str) -> tuple[str, dict[int, str]]:
    """The paragraph that starts with "Status codes:" in the ``POST /predict`` section, and its
    text split at each HTTP status (``{400: "malformed JSON/npy or empty body, ", ...}``)."""
    section = readme.split("### `POST /predict`", 1)[1].split("\n### ", 1)[0]
    paragraphs = [" ".join(p.split()) for p in section.split("\n\n")]
    found = [p for p in paragraphs if p.startswith("Status codes:")]
    assert len(found) == 1, "README: no single 'Status codes:' paragraph under POST /predict"
    paragraph = found[0]
    marks = list(re.finditer(r"(?<![\w.])([1-5]\d\d)(?![\w.])", paragraph))
    codes = [int(m.group(1)) for m in marks]
    assert len(codes) == len(set(codes)), f"README lists a status twice: {codes}"
    ends = [m.start() for m in marks[1:]] + [len(paragraph)]
    return paragraph, {code: paragraph[m.end():end] for code, m, end in zip(codes, marks, ends, strict=True)}


def _sample(value: float = 0.0, n: int = 1) -> np.ndarray:
    return np.full((n, 1, 28, 28), value, np.float32)


def _json_inf() -> bytes:
    row = "[" + ",".join(["Infinity"] * 28) + "]"
    return ('{"inputs": [[[' + ",".join([row] * 28) + "]]]}").encode()


def _card_without_range(tmp_path: Path) -> Path:
    card = json.loads((DEFAULT_MODEL_DIR / "model_card.json").read_text())
    card.pop("value_range", None)
    card.pop("value_range_policy", None)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    return path


def _weights_without_detector(tmp_path: Path) -> Path:
    """The bundled MNIST CNN, one bias nudged: another model fingerprint, so no detector fits it."""
    state = load_file(str(DEFAULT_MODEL_DIR / "model.safetensors"))
    key = sorted(k for k in state if k.endswith("bias"))[-1]
    state[key] = state[key] + 0.5
    path = tmp_path / "untrained" / "model.safetensors"
    path.parent.mkdir()
    save_file(state, str(path))
    (path.parent / "model_card.json").write_text((DEFAULT_MODEL_DIR / "model_card.json").read_text())
    return path


# (README words in the code's segment, status, error type, app, request kwargs); "gated" answers the
# special cases "full" (503 while the worker is held and one request queued) and "queued" (504)
CASES = [
    ("malformed JSON", 400, "malformed_json", "main", {"content": b'{"inputs": [', "headers": JSON}),
    ("JSON/npy", 400, "malformed_npy", "main", {"content": b"\x93NUMPY garbage", "headers": NPY}),
    ("empty body", 400, "bad_request", "main", {"content": b"", "headers": JSON}),
    ("body over `GGA_MAX_REQUEST_BYTES`", 413, "payload_too_large", "main",
     {"content": npy_bytes(_sample(n=8)), "headers": NPY}),
    ("more samples than the queue can ever hold (`GGA_MAX_QUEUE_ROWS`", 413, "payload_too_large", "main",
     {"content": npy_bytes(_sample(n=2)), "headers": NPY}),
    ("other content types", 415, "unsupported_media_type", "main",
     {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    ("wrong shape", 422, "invalid_shape", "main", {"json": {"inputs": [[[0.0] * 28] * 28]}}),
    ("dtype", 422, "invalid_dtype", "main", {"content": npy_bytes(np.zeros((1, 1, 28, 28), np.int64)),
                                             "headers": NPY}),
    ("NaN/inf", 422, "non_finite_input", "main", {"content": npy_bytes(_sample(np.nan)), "headers": NPY}),
    ("NaN/inf", 422, "non_finite_input", "main", {"content": _json_inf(), "headers": JSON}),
    ("no samples", 422, "empty_input", "main", {"json": {"inputs": []}}),
    ("values outside the card's `value_range` (`out_of_range`)", 422, "out_of_range", "main",
     {"json": {"inputs": _sample(255.0).tolist()}}),
    ("values that overflow inside the model (`non_finite_output`, naming the sample)", 422, "non_finite_output",
     "no_range", {"content": npy_bytes(np.concatenate([_sample(), _sample(3e38)])), "headers": NPY}),
    ("with `Retry-After` at once when the queue is full", 503, "overloaded", "main", "full"),
    ("no detector is fitted yet", 503, "no_detector", "no_detector", {"json": {"inputs": _sample().tolist()}}),
    ("waited longer than `GGA_REQUEST_TIMEOUT_S` in the queue", 504, "timeout", "main", "queued"),
]


def test_readme_status_codes_are_what_the_service_answers(tmp_path):
    paragraph, segments = status_segments(README.read_text())
    exercised = {status for _, status, *_ in CASES}
    assert set(segments) == exercised, f"README lists {sorted(segments)}, the service is tested for {sorted(exercised)}"
    for words, status, *_ in CASES:
        assert words in segments[status], f"README: {words!r} is not under {status}: {segments[status]!r}"
    # every setting the paragraph names exists (and is one the apps below are configured with)
    named = set(re.findall(r"`(GGA_[A-Z_]+)`", paragraph))
    assert named == {"GGA_MAX_REQUEST_BYTES", "GGA_MAX_QUEUE_ROWS", "GGA_REQUEST_TIMEOUT_S"}, named
    assert named <= set(ENV_NAMES)
    assert "2048 by default" in segments[413] and Settings(_env_file=None).batching.max_queue_rows == 2048

    apps = {
        # the gated reference CNN: one row per batch, one queued row at most, a 0.5 s queue timeout
        "main": make_settings(tmp_path, model="factory:tests.support.fakes:gated_mnist",
                              model_weights=DEFAULT_MODEL_DIR / "model.safetensors", max_batch_rows=1,
                              max_queue_rows=1, max_delay_ms=0, request_timeout_s=0.5, max_request_bytes=LIMIT_BYTES),
        "no_range": make_settings(tmp_path, model_card=_card_without_range(tmp_path)),
        "no_detector": make_settings(tmp_path, model_weights=_weights_without_detector(tmp_path)),
    }

    async def answers(name: str) -> dict[int, object]:
        out = {}
        async with Running(apps[name]) as svc:
            for i, (*_, app, kwargs) in enumerate(CASES):
                if app == name and isinstance(kwargs, dict):
                    out[i] = await svc.client.post("/predict", **kwargs)
            if name == "main":  # hold the worker in forward, queue one row: then full (503) and too late (504)
                x = {"json": {"inputs": _sample().tolist()}}
                fakes.ENTERED.clear()
                fakes.GATE.clear()
                try:
                    busy = asyncio.create_task(svc.client.post("/predict", **x))
                    while not fakes.ENTERED.is_set():
                        await asyncio.sleep(0.01)
                    queued = asyncio.create_task(svc.client.post("/predict", **x))
                    await asyncio.sleep(0.05)
                    full = await svc.client.post("/predict", **x)
                    late = await queued
                finally:
                    fakes.GATE.set()
                assert (await busy).status_code == 200
                for i, case in enumerate(CASES):
                    if case[-1] in ("full", "queued"):
                        out[i] = full if case[-1] == "full" else late
        return out

    got = {}
    for name in apps:
        got.update(run(answers(name)))
    assert set(got) == set(range(len(CASES)))
    for i, (words, status, etype, *_) in enumerate(CASES):
        r = got[i]
        assert r.status_code == status, (words, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and body["error"]["type"] == etype and body["error"]["message"], (words, body)
        if status == 503:  # Retry-After when the queue is full; none while no detector exists (POST /fit first)
            assert ("retry-after" in r.headers) == (etype == "overloaded"), (words, dict(r.headers))
    assert len(npy_bytes(_sample(n=8))) > LIMIT_BYTES > len(npy_bytes(_sample(n=2)))


def test_readme_settings_table_lists_every_setting():
    """Every setting (its GGA_* variable) is a row of the README's settings table, and every row is a setting;
    the deprecated GGA_ALPHA is a row too."""
    text = README.read_text()
    table = text[text.index("## Settings"):text.index("\n## ", text.index("## Settings") + 1)]
    rows = set()
    for line in table.splitlines():
        if line.startswith("| `GGA_"):
            rows |= set(re.findall(r"`GGA_([A-Z_]+)`", line.split("|")[1]))
    assert rows == {name.removeprefix("GGA_") for name in ENV_NAMES} | {"ALPHA"}
