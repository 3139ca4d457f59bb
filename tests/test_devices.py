"""The GGA paths on every device present: CPU always, CUDA when a GPU is there (skipped otherwise).

On CUDA these check what the CPU runs cannot: the three gradient strategies agree there,
the served detector flags the same samples as on the CPU, results do not depend on how
samples are batched, and the per-class gradient loop never waits for the host. On the
CPU the same tests run, so the code of every check is exercised in CI.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from detectors import cosine_similarity_maps
from detectors.datasets import load_idx_split
from detectors.persist import load_detector
from detectors.zoo import MnistCNN

# no service imports at module level: on a GPU machine with only torch installed, the detector tests still run
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = ROOT / "service" / "default_model"
MNIST = ROOT.parent / "shared" / "data" / "mnist"

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    x, _ = load_idx_split(MNIST, "t10k")
    noise = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    return torch.from_numpy(np.concatenate([x[:48], noise]))


def _model(device: str) -> MnistCNN:
    model = MnistCNN()
    model.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    return model.eval().to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_strategies_agree(device, digits) -> None:
    model = _model(device)
    x = digits[:32].to(device)
    out = {s: cosine_similarity_maps(model, x, 5, strategy=s) for s in ("loop", "vmap", "replicate")}
    ref = out["loop"]
    for s, res in out.items():
        assert torch.equal(res.classes, ref.classes), s
        diff = (res.csm - ref.csm).abs()
        # sign maps can flip where a gradient is ~0 and kernels sum in another order: rare, and small
        assert float(diff.max()) < 0.05, s
        assert float((diff == 0).float().mean()) > 0.95, s


@pytest.mark.parametrize("device", DEVICES)
def test_flags_match_the_cpu_and_do_not_depend_on_batching(device, digits) -> None:
    cpu = load_detector(DEFAULT_MODEL_DIR / "detector", _model("cpu"))
    det = load_detector(DEFAULT_MODEL_DIR / "detector", _model(device))
    on_cpu = cpu.score(digits)
    whole = det.score(digits.to(device))
    assert torch.equal(whole.label, on_cpu.label)
    near = (on_cpu.trust - det.alpha).abs() < 1e-3  # where rounding may put a sample on either side
    assert torch.equal(whole.flagged[~near], on_cpu.flagged[~near])
    assert float((whole.trust - on_cpu.trust).abs().max()) < 1e-3
    # the same samples in batches of 1, 7 and all at once: the same answers
    for step in (1, 7):
        parts = [det.score(digits[i:i + step].to(device)) for i in range(0, len(digits), step)]
        trust = torch.cat([p.trust for p in parts])
        flagged = torch.cat([p.flagged for p in parts])
        assert torch.equal(torch.cat([p.label for p in parts]), whole.label), step
        assert float((trust - whole.trust).abs().max()) < 1e-6, step
        assert torch.equal(flagged, whole.flagged), step


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("strategy", ["loop", "vmap", "replicate"])
def test_no_host_synchronisation_per_class(strategy, digits) -> None:
    """The host waits for the device a fixed number of times per batch (the finiteness check of
    the logits), however many classes are analysed: nothing inside the per-class loop syncs."""
    model = _model("cuda")
    x = digits[:16].cuda()

    def syncs(top_n: int) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                cosine_similarity_maps(model, x, top_n, strategy=strategy)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    syncs(3)  # warm-up (lazy initialisation may synchronise)
    assert syncs(3) == syncs(10)


@pytest.mark.parametrize("device", DEVICES)
def test_service_serves_on_the_device(device, digits, tmp_path) -> None:
    pytest.importorskip("fastapi")
    from tests.support.service import Running, make_settings, npy_bytes, run

    x = digits[:8].numpy()

    async def go():
        async with Running(make_settings(tmp_path, device=device)) as svc:
            info = (await svc.client.get("/info")).json()
            r = await svc.client.post("/predict", content=npy_bytes(x), headers={"content-type": "application/x-npy"})
            return info, r

    info, r = run(go())
    assert info["device"].startswith(device)
    assert r.status_code == 200
    ref = load_detector(DEFAULT_MODEL_DIR / "detector", _model("cpu")).score(torch.from_numpy(x))
    rows = r.json()["predictions"]
    assert [p["label"] for p in rows] == ref.label.tolist()
    assert max(abs(p["trust"] - t) for p, t in zip(rows, ref.trust.tolist(), strict=True)) < 1e-3
