"""Image bodies of POST /predict (service/images.py, service/preprocessing.py) and ``explain``, in process."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.datasets import read_idx
from service.images import to_sample
from service.models import ModelCard, ModelLoadError
from service.settings import DEFAULT_MODEL_DIR
from tests.support.service import MNIST, Running, make_settings, npy_bytes, run
from tests.support.threads import one_thread  # noqa: F401 - autouse fixture

CARD = ModelCard.from_dict(__import__("json").loads((DEFAULT_MODEL_DIR / "model_card.json").read_text()), "bundled")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:64], read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:64]


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **kw) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_png_of_an_mnist_digit_is_the_idx_tensor(digits):
    pixels, _ = digits
    for i in range(16):
        x = to_sample(opened(encode(pixels[i])), CARD.preprocessing)
        assert x.shape == (1, 28, 28) and x.dtype == np.float32
        assert np.abs(x - pixels[i][None].astype(np.float32) / 255.0).max() <= 1 / 255
        # a dark digit on white paper (inverted), with an EXIF orientation to undo, is the same digit
        paper = Image.fromarray(255 - pixels[i]).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6  # stored turned a quarter to the left: shown turned back to the right
        y = to_sample(opened(encode(paper, exif=exif.tobytes())), CARD.preprocessing)
        np.testing.assert_array_equal(y, x)
    # transparency lies on the card's white background, then auto-inversion makes it the dark ground
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = pixels[0]  # a black digit drawn only by its alpha
    z = to_sample(opened(encode(rgba)), CARD.preprocessing)
    assert np.abs(z - pixels[0][None] / 255.0).max() <= 1 / 255


def test_image_bodies_predict_as_the_array_body_in_order(tmp_path, digits):
    pixels, labels = digits
    x = pixels[:, None].astype(np.float32) / 255.0
    order = [5, 0, 3, 7, 1, 6, 2, 4]

    async def go():
        async with Running(make_settings(tmp_path)) as r:
            arrays = (await r.client.post("/predict", content=npy_bytes(x[:8]),
                                          headers={"content-type": "application/x-npy"})).json()["predictions"]
            one = (await r.client.post("/predict", content=encode(pixels[0]),
                                       headers={"content-type": "image/png"})).json()["predictions"]
            files = [("file", (f"{i}.png", encode(pixels[i]), "image/png")) for i in order]
            many = (await r.client.post("/predict", files=files)).json()["predictions"]
            return arrays, one, many

    arrays, one, many = run(go())
    assert [p["label"] for p in arrays] == labels[:8].tolist()
    keys = ("label", "trust", "flagged", "score", "confidence", "top_classes")
    assert {k: one[0][k] for k in keys} == {k: arrays[0][k] for k in keys}
    assert [{k: p[k] for k in keys} for p in many] == [{k: arrays[i][k] for k in keys} for i in order]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (grey), with almost no data."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b""))


def test_hostile_images_get_their_4xx_and_reach_no_batch(tmp_path, digits):
    pixels, _ = digits
    good = encode(pixels[0])
    jpeg = encode(pixels[0], "JPEG", quality=90)
    webp = encode(pixels[0], "WEBP", lossless=True)
    frames = [Image.fromarray(pixels[i]) for i in range(2)]
    apng, anim_webp = io.BytesIO(), io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    frames[0].save(anim_webp, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    bomb = encode(Image.new("L", (2000, 2000), 255))  # 4 Mpixel, a few kB: over the limit set below
    assert len(bomb) < 20_000
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    corrupt = bytearray(good)
    corrupt[60:80] = bytes(20)
    cases = [
        (noise, "image/png", 400, "malformed_image"),
        (noise, "image/jpeg", 400, "malformed_image"),
        (noise, "image/webp", 400, "malformed_image"),
        (b"\x89PNG\r\n\x1a\n" + noise, "image/png", 400, "malformed_image"),
        (b"\xff\xd8\xff" + noise, "image/jpeg", 400, "malformed_image"),
        (b"RIFF\0\0\0\0WEBP" + noise, "image/webp", 400, "malformed_image"),
        (good[: len(good) // 2], "image/png", 400, "malformed_image"),
        (jpeg[: len(jpeg) // 2], "image/jpeg", 400, "malformed_image"),
        (webp[: len(webp) // 2], "image/webp", 400, "malformed_image"),
        (bytes(corrupt), "image/png", 400, "malformed_image"),
        (b"", "image/png", 400, "malformed_image"),
        (good, "image/jpeg", 415, "content_type_mismatch"),
        (jpeg, "image/webp", 415, "content_type_mismatch"),
        (webp, "image/png", 415, "content_type_mismatch"),
        (good, "image/gif", 415, "unsupported_media_type"),
        (png_declaring(0, 0), "image/png", 422, "empty_image"),
        (png_declaring(0, 28), "image/png", 422, "empty_image"),
        (png_declaring(100_000, 100_000), "image/png", 413, "image_too_large"),
        (png_declaring(1001, 1000), "image/png", 413, "image_too_large"),
        (bomb, "image/png", 413, "image_too_large"),
        (apng.getvalue(), "image/png", 422, "multi_frame"),
        (anim_webp.getvalue(), "image/webp", 422, "multi_frame"),
    ]

    async def go():
        settings = make_settings(tmp_path, max_image_pixels=1_000_000, max_batch_rows=4, max_queue_rows=8)
        async with Running(settings) as r:
            c = r.client
            got = []
            for body, ctype, _, _ in cases:
                resp = await c.post("/predict", content=body, headers={"content-type": ctype})
                got.append((resp.status_code, resp.json()["error"]["type"]))
            form = [
                ([("file", ("a.png", good, "image/png"))] * 9, 413, "payload_too_large"),
                ([("file", ("a.png", good, "image/png")), ("file", ("b.png", noise, "image/png"))], 400,
                 "malformed_image"),
                ([("file", ("a.png", good, "image/png")), ("file", ("b.png", jpeg, "image/png"))], 415,
                 "content_type_mismatch"),
                ([("file", ("a.txt", b"hello", "text/plain"))], 415, "unsupported_media_type"),
                ([("image", ("a.png", good, "image/png"))], 400, "malformed_multipart"),
            ]
            for files, _, _ in form:
                resp = await c.post("/predict", files=files)
                got.append((resp.status_code, resp.json()["error"]["type"]))
            no_file = await c.post("/predict", data={"file": "text"}, files=[("other", ("x", b"", "image/png"))])
            got.append((no_file.status_code, no_file.json()["error"]["type"]))
            broken = await c.post("/predict", content=b"--x\r\nnonsense", headers={
                "content-type": "multipart/form-data; boundary=x"})
            got.append((broken.status_code, broken.json()["error"]["type"]))
            before = await r.metrics()
            fine = await c.post("/predict", files=[("file", ("ok.webp", webp, "application/octet-stream")),
                                                   ("file", ("ok.jpg", jpeg, None))])
            after = await r.metrics()
            return got, before, fine, after, [(s, t) for _, s, t in form]

    got, before, fine, after, form_expected = run(go())
    assert got == [(s, t) for _, _, s, t in cases] + form_expected + [(400, "malformed_multipart")] * 2
    assert before.get(("gga_rows_total", ()), 0) == 0  # nothing hostile reached a batch
    assert fine.status_code == 200 and [p["label"] for p in fine.json()["predictions"]] == [7, 7]
    assert after[("gga_rows_total", ())] == 2


def test_explain_gives_each_components_p_value(tmp_path, digits, reference):
    pixels, _ = digits
    x = pixels[:3, None].astype(np.float32) / 255.0
    x[2] = np.rot90(x[2], axes=(1, 2))  # an odd one

    async def go():
        async with Running(make_settings(tmp_path)) as r:
            plain = (await r.client.post("/predict", json={"inputs": x.tolist()})).json()
            asked = (await r.client.post("/predict", json={"inputs": x.tolist(), "explain": True})).json()
            query = (await r.client.post("/predict?explain=true", content=encode(pixels[0]),
                                         headers={"content-type": "image/png"})).json()
            bad = await r.client.post("/predict", json={"inputs": x.tolist(), "explain": "yes"})
            info = (await r.client.get("/info")).json()
            return plain, asked, query, bad, info

    plain, asked, query, bad, info = run(go())
    assert all("components" not in p for p in plain["predictions"])
    out = reference.score(torch.from_numpy(x))
    names = list(reference.components)
    assert names == info["detector"]["components"] and len(names) >= 3
    for i, p in enumerate(asked["predictions"]):
        assert [c["name"] for c in p["components"]] == names
        np.testing.assert_allclose([c["p_value"] for c in p["components"]], np.exp(out.features[i].double().numpy()),
                                   rtol=1e-6)
    assert query["predictions"][0]["components"] == asked["predictions"][0]["components"]
    assert bad.status_code == 422
    assert info["preprocessing"]["invert"] == "auto" and info["preprocessing"]["size"] == [28, 28]


def test_card_preprocessing_is_checked():
    base = {"name": "m", "input_shape": [3, 32, 32], "class_names": list("abc")}
    card = ModelCard.from_dict({**base, "preprocessing": {"resize": 36, "mean": [0.5] * 3, "std": [0.25] * 3}}, "m")
    img = Image.fromarray(np.full((40, 80, 3), 255, np.uint8))
    x = to_sample(img, card.preprocessing)
    assert x.shape == (3, 32, 32) and np.allclose(x, (1.0 - 0.5) / 0.25)
    assert ModelCard.from_dict({**base, "input_shape": [7]}, "m").preprocessing is None
    for bad in ({"color_mode": "L"}, {"resize": 16}, {"invert": "maybe"}, {"mean": [0.5] * 3}, {"sharpen": True},
                {"std": [1, 1, 0], "mean": [0, 0, 0]}, {"scale": [1, 0]}):
        with pytest.raises(ModelLoadError, match="preprocessing"):
            ModelCard.from_dict({**base, "preprocessing": bad}, "m")
