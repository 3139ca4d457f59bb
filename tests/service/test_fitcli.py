"""``gga-fit``: the offline fit writes versions a server then serves; bad input writes nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from detectors.fingerprint import model_fingerprint
from detectors.persist import load_detector
from detectors.zoo import MnistCNN
from service.fitcli import ProgressBar, main
from service.settings import DEFAULT_MODEL_DIR
from tests.support.service import Running, make_settings, run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The command reads GGA_* like the server: start every test from none of them."""
    for key in list(os.environ):
        if key.startswith("GGA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("GGA_DEVICE", "cpu")


@pytest.fixture(scope="module")
def bundled_model():
    model = MnistCNN()
    model.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    return model.eval()


def _fit(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    """``main(argv)`` in-process: exit status, the JSON line (None if stdout is empty), stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) <= 1, out
    return code, (json.loads(lines[0]) if lines else None), err


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_fit_writes_new_versions_that_a_server_serves(tmp_path, mnist_test, capsys, monkeypatch, bundled_model):
    x, y = mnist_test
    np.savez(tmp_path / "train.npz", x=x[:300], y=y[:300])
    np.savez(tmp_path / "cal.npz", x=x[300:500], y=y[300:500])
    art = tmp_path / "artifacts"
    fingerprint = model_fingerprint(bundled_model)
    store = art / fingerprint[:16]

    # 1: the artifact dir from the environment, as the server reads it
    monkeypatch.setenv("GGA_ARTIFACT_DIR", str(art))
    code, res, err = _fit(["--data", tmp_path / "train.npz", "--preset", "gga", "--no-progress"], capsys)
    assert code == 0, err
    assert err == ""  # --no-progress: nothing on stderr
    assert res["version"] == "v1" and res["path"] == str(store / "v0001")
    assert res["fingerprint"] == fingerprint and res["model"] == "mnist_cnn"
    assert res["kind"] == "gga" and res["preset"] == "gga" and res["components"] == ["gga+softmax"]
    assert res["config"]["top_n"] == 5 and res["config"]["alpha"] == 0.05
    det = load_detector(store / "v0001", bundled_model)
    st = det.fit_stats
    assert det.preset == "gga" and det.config.top_n == 5
    assert (res["n_samples"], res["n_correct"], res["n_fit"], res["n_calibration"]) == \
        (st.n_samples, st.n_correct, st.n_fit, st.n_calibration)
    assert res["n_samples"] == 300 and res["n_fit"] + res["n_calibration"] == res["n_correct"]
    assert res["threshold"] == st.threshold and res["model_accuracy"] == st.model_accuracy

    # 2: the flag overrides the environment; a separate calibration file; top-n all; alpha; progress shown
    monkeypatch.setenv("GGA_ARTIFACT_DIR", str(tmp_path / "elsewhere"))
    code, res2, err = _fit(["--data", tmp_path / "train.npz", "--calibration", tmp_path / "cal.npz",
                            "--artifact-dir", art, "--preset", "gga", "--top-n", "all", "--alpha", "0.1",
                            "--batch-size", "128"], capsys)
    assert code == 0, err
    assert res2["version"] == "v2" and res2["path"] == str(store / "v0002")
    assert not (tmp_path / "elsewhere").exists()
    assert "500/500 100%" in err.splitlines()[-1] and "samples/s" in err  # stderr is not a TTY: lines
    det2 = load_detector(store / "v0002", bundled_model)
    assert det2.config.top_n == 10 and det2.config.alpha == 0.1 and res2["config"]["top_n"] == 10
    assert det2.fit_stats.n_samples == res2["n_samples"] == 500
    assert det2.fit_stats.n_fit == res2["n_fit"] == res["n_correct"]  # all correct training samples fit LODA
    # every correctly classified calibration sample calibrates (the training part is the same as in fit 1)
    assert det2.fit_stats.n_calibration == res2["n_calibration"] == res2["n_correct"] - res["n_correct"]
    assert sorted(p.name for p in store.iterdir()) == ["v0001", "v0002"]  # no temporary leftovers

    # a server started on the same store serves the newest version
    async def go():
        async with Running(make_settings(tmp_path, artifact_dir=art)) as svc:
            info = (await svc.client.get("/info")).json()
            ready = (await svc.client.get("/readyz")).json()
            return info, ready

    info, ready = run(go())
    assert info["detector_version"] == "v2" and ready["detector_version"] == "v2"
    assert info["detector"]["preset"] == "gga" and info["detector"]["fit"]["n_samples"] == 500


def test_bad_arguments_and_data_exit_2_and_write_nothing(tmp_path, mnist_test, capsys):
    x, y = mnist_test
    x, y = x[:100], y[:100]
    files = {
        "shape": dict(x=x[:, 0], y=y),
        "labels": dict(x=x, y=y + 10),
        "uint8": dict(x=(x * 255).astype(np.uint8), y=y),
        "no_y": dict(x=x),
        "half_cal": dict(x=x, y=y, x_cal=x),
        "with_cal": dict(x=x, y=y, x_cal=x, y_cal=y),
        "ok": dict(x=x, y=y),
    }
    for name, arrays in files.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    art = tmp_path / "artifacts"
    t = tmp_path
    cases = [
        (["--data", t / "shape.npz"], "shape.npz: x input has shape (100, 28, 28); expected (B, 1, 28, 28)"),
        (["--data", t / "labels.npz"], "labels.npz: labels in y must be in [0, 9]"),
        (["--data", t / "uint8.npz"], "uint8.npz: x has dtype uint8; expected floats"),
        (["--data", t / "no_y.npz"], "no_y.npz: the .npz must hold arrays 'x' (n, *input_shape) and 'y' (n,)"),
        (["--data", t / "half_cal.npz"], "calibration data needs both 'x_cal' and 'y_cal'"),
        (["--data", t / "junk.npz"], "junk.npz: not a valid .npz archive"),
        (["--data", t / "missing.npz"], "missing.npz: no such file"),
        (["--data", t / "ok.npz", "--calibration", t / "missing.npz"], "missing.npz: no such file"),
        (["--data", t / "ok.npz", "--calibration", t / "shape.npz"],
         "shape.npz: x input has shape (100, 28, 28); expected (B, 1, 28, 28)"),
        (["--data", t / "with_cal.npz", "--calibration", t / "ok.npz"], "already holds x_cal/y_cal"),
        (["--data", t / "ok.npz", "--top-n", "11"], "top_n must be between 3 and the model's 10 classes, got 11"),
        (["--data", t / "ok.npz", "--top-n", "2"], "top_n must be an integer >= 3"),
        (["--data", t / "ok.npz", "--top-n", "five"], "argument --top-n: expected an integer >= 3 or 'all'"),
        (["--data", t / "ok.npz", "--alpha", "1.5"], "alpha must be a number in (0, 1)"),
        (["--data", t / "ok.npz", "--preset", "best"], "argument --preset: invalid choice: 'best'"),
        (["--data", t / "ok.npz", "--batch-size", "0"], "GGA_FIT_BATCH_SIZE=0: Input should be greater than or equal"),
        (["--preset", "gga"], "the following arguments are required: --data"),
    ]
    for argv, message in cases:
        code, res, err = _fit([*argv, "--artifact-dir", art], capsys)
        assert (code, res) == (2, None), (argv, code, err)
        assert message in err, (argv, err)
        assert not art.exists(), argv


def test_bad_model_configuration_exits_2(tmp_path, mnist_test, capsys, monkeypatch):
    x, y = mnist_test
    np.savez(tmp_path / "ok.npz", x=x[:50], y=y[:50])
    monkeypatch.setenv("GGA_MODEL", "cifar_resnet56")  # no bundled weights
    code, res, err = _fit(["--data", tmp_path / "ok.npz", "--artifact-dir", tmp_path / "a"], capsys)
    assert (code, res) == (2, None)
    assert "cannot load the model (cifar_resnet56)" in err and "GGA_MODEL_WEIGHTS" in err
    assert not (tmp_path / "a").exists()


def test_fit_failure_exits_1_and_writes_nothing(tmp_path, mnist_test, capsys):
    x, y = mnist_test
    np.savez(tmp_path / "few.npz", x=x[:20], y=y[:20])  # too few to ever flag at alpha 0.05
    art = tmp_path / "artifacts"
    code, res, err = _fit(["--data", tmp_path / "few.npz", "--preset", "gga", "--no-progress",
                           "--artifact-dir", art], capsys)
    assert (code, res) == (1, None)
    assert "fit failed, nothing written: ValueError:" in err and "can never flag at alpha=0.05" in err
    assert not art.exists()


def test_progress_bar_lines_off_a_terminal():
    ticks = iter([0.0, 2.0, 3.0, 4.0])
    buf = io.StringIO()
    bar = ProgressBar(buf, clock=lambda: next(ticks))
    bar(100, 400)  # t=2: the first update is always shown
    bar(200, 400)  # t=3: within the 10 s log interval, skipped
    bar(400, 400)  # t=4: the last is always shown
    bar.close()
    assert buf.getvalue().splitlines() == [
        "features [#######.......................] 100/400  25% 50.0 samples/s elapsed 00:02 ETA 00:06",
        "features [##############################] 400/400 100% 100.0 samples/s elapsed 00:04 ETA 00:00",
    ]


def test_entry_point_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gga-fit"] == "service.fitcli:main"


def test_installed_command_in_a_subprocess(tmp_path, mnist_test):
    x, y = mnist_test
    np.savez(tmp_path / "train.npz", x=x[:300], y=y[:300])
    script = Path(sys.executable).parent / "gga-fit"  # the console script of `pip install -e .`
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "service.fitcli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGA_")}
    env.update(GGA_DEVICE="cpu", GGA_ARTIFACT_DIR=str(tmp_path / "artifacts"))
    proc = subprocess.run([*cmd, "--data", str(tmp_path / "train.npz"), "--preset", "gga"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["version"] == "v1" and res["n_samples"] == 300 and res["preset"] == "gga"
    assert Path(res["path"]).parent.parent == tmp_path / "artifacts" and (Path(res["path"]) / "detector.json").exists()
    assert "300/300 100%" in proc.stderr
