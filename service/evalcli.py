"""``gga-eval``: evaluate a fitted detector on your own in-distribution and OOD/attack data.

    gga-eval --in clean.npz --ood fashion=fashion.npz [--ood noise=noise.npz ...]
             (--detector DIR | --url http://host:port) --out REPORT_DIR
             [--max-samples N] [--batch-size B] [--no-progress]

Two ways to reach the detector:

- ``--detector DIR``: a saved detector folder (``detector.json`` + ``detector.safetensors``,
  GGA or composite, e.g. ``service/default_model/detector`` or a version ``v000N`` of the
  artifact store), scored in this process. The model is named exactly as for the server:
  one :class:`Settings` from the ``GGA_*`` environment; ``--model``, ``--model-weights``,
  ``--model-card`` and ``--device`` override ``GGA_MODEL``, ``GGA_MODEL_WEIGHTS``,
  ``GGA_MODEL_CARD`` and ``GGA_DEVICE``. A sample is flagged when trust < the served alpha
  (``GGA_SERVE_ALPHA``, else the detector's own), as the server does.
- ``--url``: a running service, scored through :class:`service.client.GGAClient`
  (``/info`` for the detector, ``/predict`` in batches of ``--batch-size``).

The data: ``--in`` is an ``.npz`` with ``x`` (n, *input_shape), scaled as the model takes
it, and optionally ``y`` (n,) integer labels; every ``--ood NAME=PATH`` holds ``x``. With
labels, the in-distribution samples of every detection metric are the *correctly
classified* clean samples (the protocol of the project's reproduction, ``benchmarks/repro``)
and the misclassification metrics (AUROC wrong vs right, AURC, risk at 95% coverage) and
the accuracy are reported too; without labels, every clean sample is in-distribution.

Per set (OOD = positive class, scores: higher = more anomalous; :mod:`detectors.metrics`):
AUROC, AUPR-In, AUPR-Out, TNR at 95% TPR and the flag rate at the served alpha; the flag
rate of the clean set too. Written to ``REPORT_DIR``: ``report.md`` (table, command, date,
detector kind / preset / version / alpha, figures), ``report.json`` (every number, exact),
``scores.npz`` (per set ``<set>.score``, ``.trust``, ``.flagged``, ``.label``, and
``clean.y``), ``roc.png`` (all sets), ``trust_<set>.png`` (clean vs each set) and
``csm_<set>.png`` (the first sample's N x N CSM, predicted class first; skipped with a
note when the detector gives no CSM). Figures need matplotlib: ``pip install 'gga-trust[eval]'``.

Exit status: 0 report written; 2 bad arguments, settings or files (the message names
them); 1 the evaluation failed (the service unreachable or failing, the scoring raised,
the report could not be written).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

log = logging.getLogger("service.evalcli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CLEAN = "clean"
TPR = 0.95
COVERAGE = 0.95
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MATPLOTLIB_HINT = ("gga-eval draws its figures with matplotlib, which comes with the 'eval' extra: "
                   "pip install 'gga-trust[eval]' (in a checkout: pip install -e '.[eval]')")
POSITIVES_LABELLED = ("in-distribution = the correctly classified samples of the clean set (as in the project's "
                      "reproduction, benchmarks/repro); the misclassified ones are evaluated separately")
POSITIVES_UNLABELLED = "in-distribution = every sample of the clean set (no labels y in the file)"


class UsageError(Exception):
    """Bad arguments, settings or files: exit 2."""


class EvalFailed(Exception):
    """The evaluation could not be completed: exit 1."""


# --------------------------------------------------------------------------- arguments


def _ood(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH.npz, e.g. fashion=fashion.npz; got {text!r}")
    if not _NAME_RE.match(name):
        raise argparse.ArgumentTypeError(f"set name {name!r}: use letters, digits, '_', '.', '-' (at most 64, "
                                         "starting with a letter or digit)")
    if name == CLEAN:
        raise argparse.ArgumentTypeError(f"the name {CLEAN!r} is the in-distribution set (--in); pick another")
    return name, Path(path)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gga-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="clean", required=True, type=Path, metavar="CLEAN.npz",
                   help="in-distribution data: x (n, *input_shape), optionally y (n,) integer labels")
    p.add_argument("--ood", action="append", type=_ood, required=True, metavar="NAME=PATH.npz",
                   help="an OOD or attack set holding x (n, *input_shape); repeat for more sets")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--detector", type=Path, metavar="DIR",
                     help="a saved detector folder (detector.json + detector.safetensors), scored in this process")
    src.add_argument("--url", metavar="URL", help="a running service, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, type=Path, metavar="REPORT_DIR", help="where the report is written")
    p.add_argument("--max-samples", type=_positive_int, metavar="N", help="use the first N samples of each set")
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="B",
                   help="samples per scoring call / per /predict request (default 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    local = p.add_argument_group("with --detector: the model, as for the server (default: the GGA_* environment)")
    local.add_argument("--model", metavar="SPEC", help="like GGA_MODEL: mnist_cnn, cifar_resnet20, cifar_resnet56, "
                       "torchscript:<path> or factory:<module>:<function>")
    local.add_argument("--model-weights", type=Path, metavar="PATH", help="like GGA_MODEL_WEIGHTS")
    local.add_argument("--model-card", type=Path, metavar="PATH", help="like GGA_MODEL_CARD")
    local.add_argument("--device", choices=("auto", "cpu", "cuda"), help="like GGA_DEVICE (default auto)")
    remote = p.add_argument_group("with --url")
    remote.add_argument("--timeout", type=_positive_float, default=120.0, metavar="S",
                        help="seconds per HTTP request (default 120)")
    return p


# --------------------------------------------------------------------------- data


@dataclass
class DataSet:
    name: str
    path: Path
    x: np.ndarray  # float32 (n, *input_shape)
    y: np.ndarray | None = None  # int64 (n,), the clean set only
    n_file: int = 0  # samples in the file, before --max-samples


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise UsageError(f"{path}: no array 'x' in the .npz (it holds {sorted(npz.files) or 'nothing'}); "
                                 "expected x (n, *input_shape)")
            return {k: npz[k] for k in keys if k in npz.files}
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - not an .npz, truncated, object arrays
        raise UsageError(f"{path}: cannot read it as an .npz of numeric arrays: {type(exc).__name__}: {exc}") from exc


def load_set(name: str, path: Path, input_shape: tuple[int, ...], n_classes: int, max_samples: int | None,
             with_labels: bool) -> DataSet:
    """One set, validated: x (n, *input_shape) finite numbers, y (n,) class indices when present."""
    arrays = _read_npz(path, ("x", "y") if with_labels else ("x",))
    x = arrays["x"]
    if x.dtype.kind not in "biuf":
        raise UsageError(f"{path}: x has dtype {x.dtype}; expected numbers (float32, scaled like the model's input)")
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        hint = ""
        if x.ndim == 4 and len(input_shape) == 3 and tuple(x.shape[1:]) == (*input_shape[1:], input_shape[0]):
            hint = " (channels last? transpose to NCHW, e.g. detectors.datasets.load_cifar_npz for the CIFAR files)"
        raise UsageError(f"{path}: x has shape {tuple(x.shape)}; expected (n, {', '.join(map(str, input_shape))})"
                         f"{hint}")
    if len(x) == 0:
        raise UsageError(f"{path}: x holds no samples")
    n_file = len(x)
    if max_samples is not None:
        x = x[:max_samples]
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        raise UsageError(f"{path}: x[{int(np.flatnonzero(~finite)[0])}] holds NaN or infinite values")
    y = None
    if "y" in arrays:
        y = arrays["y"]
        if y.ndim != 1 or len(y) != n_file:
            raise UsageError(f"{path}: y has shape {tuple(y.shape)}; expected ({n_file},), one label per sample of x")
        if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y)))):
            raise UsageError(f"{path}: y must hold integer class indices, got dtype {y.dtype}")
        if max_samples is not None:
            y = y[:max_samples]
        y = y.astype(np.int64)
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if bad.size:
            raise UsageError(f"{path}: y[{int(bad[0])}] = {int(y[bad[0]])} is not a class of this model "
                             f"(0..{n_classes - 1})")
    return DataSet(name, path, x, y, n_file)


# --------------------------------------------------------------------------- scoring


@dataclass
class SetScores:
    """What the detector says about one set: one entry per sample, plus the first sample's CSM."""

    label: np.ndarray  # int64
    score: np.ndarray  # float64, higher = more anomalous
    trust: np.ndarray  # float64
    flagged: np.ndarray  # bool, trust < the served alpha
    csm: np.ndarray | None = None  # (N, N) of sample 0, predicted class first
    csm_classes: list[int] = field(default_factory=list)  # the classes of its rows/columns (as far as known)
    nonfinite_scores: int = 0  # scores the service returned as null (counted as +inf)
    range_warnings: int = 0  # samples the service scored with a value-range warning (the card's 'warn' policy)


class LocalScorer:
    """A saved detector scored in this process, the model named as for the server."""

    mode = "detector"

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from detectors.persist import load_detector, read_meta
        from detectors.presets import describe
        from service.artifacts import BUNDLED_VERSION
        from service.fitcli import UsageError as FitUsageError
        from service.fitcli import load_served_model
        from service.settings import DEFAULT_MODEL_DIR

        self._torch = torch
        overrides = {k: v for k, v in (("model", args.model), ("model_weights", args.model_weights),
                                       ("model_card", args.model_card), ("device", args.device)) if v is not None}
        try:
            settings, self.device, self.model, self.card = load_served_model(overrides)
        except FitUsageError as exc:
            raise UsageError(str(exc)) from exc
        directory = args.detector
        if not directory.is_dir():
            raise UsageError(f"--detector {directory}: no such folder")
        try:
            read_meta(directory)
            self.detector = load_detector(directory, self.model)
        except Exception as exc:  # noqa: BLE001 - no detector there, another model's (fingerprint), broken files
            raise UsageError(f"--detector {directory}: {exc}") from exc
        self.alpha = float(settings.model.alpha if settings.model.alpha is not None else self.detector.alpha)
        self.input_shape = tuple(self.card.input_shape)
        self.class_names = list(self.card.class_names)
        m = re.match(r"^v(\d{4,})$", directory.name)
        if m:
            version = f"v{int(m.group(1))}"
        elif directory.resolve() == (DEFAULT_MODEL_DIR / "detector").resolve():
            version = BUNDLED_VERSION
        else:
            version = directory.name
        meta = self.detector.metadata()
        self.info = {
            **describe(self.detector), "version": version, "alpha": self.alpha,
            "alpha_source": "GGA_SERVE_ALPHA" if settings.model.alpha is not None else "the detector's",
            "path": str(directory.resolve()), "model_fingerprint": meta.get("model_fingerprint"),
            "config": meta.get("config"),
        }
        self.model_name = self.card.name
        self.source = str(directory.resolve())
        self.device_name = str(self.device)

    def check(self, ds: DataSet) -> list[str]:
        """The model card's value range, as the server applies it: an error (reject) or notes (warn)."""
        bad = self.card.check_range(ds.x)
        if not bad:
            return []
        lo, hi = self.card.value_range
        i, mn, mx = bad[0]
        what = (f"{ds.path}: {len(bad)} sample(s) outside the model card's value range [{lo:g}, {hi:g}], the first "
                f"x[{i}] with values in [{mn:g}, {mx:g}]")
        if self.card.value_range_policy == "reject":
            raise UsageError(what + " (the server answers 422 for them; scale x like the model's input, e.g. "
                             "pixels / 255)")
        return [what + " (the card's policy is 'warn': scored anyway)"]

    def score(self, x: np.ndarray, return_csm: bool) -> dict:
        out = self.detector.score(self._torch.from_numpy(x).to(self.device), return_csm=return_csm)
        trust = out.trust.double().numpy()
        return {"label": out.label.numpy().astype(np.int64), "score": out.score.double().numpy(), "trust": trust,
                "flagged": trust < self.alpha, "top_classes": out.top_classes.numpy(),
                "csm": None if out.csm is None else out.csm.float().numpy()}

    def close(self) -> None:
        pass


class RemoteScorer:
    """A running service, through the Python client."""

    mode = "url"

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        from service.client import GGAClient, GGAError

        self._httpx, self._GGAError = httpx, GGAError
        for flag in ("model", "model_weights", "model_card", "device"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} names the model of --detector; with --url the "
                                 "service's own model is used")
        self.url = args.url.rstrip("/")
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise UsageError(f"--url {args.url!r}: expected http://host:port or https://host:port")
        self.client = GGAClient(self.url, timeout=args.timeout)
        try:
            info = self.client.info()
        except httpx.HTTPError as exc:
            self.client.close()
            raise EvalFailed(f"cannot reach the service at {self.url}: {type(exc).__name__}: {exc}") from exc
        except GGAError as exc:
            self.client.close()
            raise EvalFailed(f"{self.url}/info answered {exc}") from exc
        det = info.get("detector")
        if det is None:
            self.client.close()
            raise EvalFailed(f"the service at {self.url} serves no detector for {info.get('model')} yet "
                             "(/readyz is 503): fit one first (POST /fit or gga-fit)")
        self.input_shape = tuple(int(v) for v in info["input_shape"])
        self.client.input_shape = self.input_shape
        self.class_names = list(info.get("class_names") or [])
        self.alpha = float(info["alpha"])
        self.info = {
            "kind": det.get("kind"), "preset": det.get("preset"), "components": det.get("components"),
            "version": info.get("detector_version"), "alpha": self.alpha, "alpha_source": "the service's /info",
            "url": self.url, "model_fingerprint": det.get("model_fingerprint"), "config": det.get("config"),
        }
        self.model_name = info.get("model")
        self.source = self.url
        self.device_name = info.get("device")
        self._set = ""

    def check(self, ds: DataSet) -> list[str]:
        self._set = f"{ds.name} ({ds.path})"
        return []

    def score(self, x: np.ndarray, return_csm: bool) -> dict:
        from service.client import BadRequest

        try:
            res = self.client.predict(x, return_csm=return_csm)
        except BadRequest as exc:
            raise UsageError(f"the service refused samples of {self._set}: {exc.status} {exc.type}: {exc.message}"
                             + (" (lower --batch-size)" if exc.status == 413 else "")) from exc
        except self._GGAError as exc:
            raise EvalFailed(f"/predict failed for {self._set}: {exc}") from exc
        except self._httpx.HTTPError as exc:
            raise EvalFailed(f"/predict failed for {self._set}: {type(exc).__name__}: {exc}") from exc
        if len(res) != len(x):
            raise EvalFailed(f"/predict answered {len(res)} rows for {len(x)} samples of {self._set}")
        return {"label": res.labels, "score": res.score, "trust": res.trust, "flagged": res.flagged,
                "top_classes": res.top_classes, "csm": res.csm, "warnings": len(res.warnings)}

    def close(self) -> None:
        self.client.close()


def score_set(scorer, ds: DataSet, batch_size: int, progress: bool) -> SetScores:
    """Score ``ds`` in batches (the first batch with its CSM), with a progress bar on stderr."""
    from service.fitcli import ProgressBar

    bar = ProgressBar(sys.stderr, label=f"scoring {ds.name}") if progress else None
    parts: list[dict] = []
    n = len(ds.x)
    try:
        for start in range(0, n, batch_size):
            parts.append(scorer.score(ds.x[start:start + batch_size], return_csm=(start == 0)))
            if bar is not None:
                bar(min(start + batch_size, n), n)
    except (UsageError, EvalFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the detector is reported as one
        log.debug("scoring failed", exc_info=True)
        raise EvalFailed(f"scoring {ds.name} ({ds.path}) failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    score = np.concatenate([p["score"] for p in parts]).astype(np.float64)
    nonfinite = int(np.isnan(score).sum())
    score[np.isnan(score)] = np.inf  # the service sends a non-finite score as null: the most anomalous
    first = parts[0]
    csm = None if first["csm"] is None else np.asarray(first["csm"][0], dtype=np.float64)
    return SetScores(
        label=np.concatenate([p["label"] for p in parts]).astype(np.int64), score=score,
        trust=np.concatenate([p["trust"] for p in parts]).astype(np.float64),
        flagged=np.concatenate([p["flagged"] for p in parts]).astype(bool), csm=csm,
        csm_classes=[int(c) for c in first["top_classes"][0]] if csm is not None else [],
        nonfinite_scores=nonfinite, range_warnings=sum(p.get("warnings", 0) for p in parts))


# --------------------------------------------------------------------------- metrics


def detection_metrics(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    from detectors.metrics import aupr_in, aupr_out, auroc, tnr_at_tpr

    return {"auroc": auroc(s_in, s_out), "aupr_in": aupr_in(s_in, s_out), "aupr_out": aupr_out(s_in, s_out),
            "tnr_at_95_tpr": tnr_at_tpr(s_in, s_out, TPR)}


def evaluate(clean: DataSet, clean_scores: SetScores, sets: list[tuple[DataSet, SetScores]]) -> dict:
    """The numbers of report.json: the clean set (and its misclassification metrics) and every OOD set."""
    from detectors.metrics import aurc, auroc, risk_at_coverage

    out_clean = {"file": str(clean.path), "n": len(clean.x), "n_file": clean.n_file, "labels": clean.y is not None,
                 "flag_rate": float(np.mean(clean_scores.flagged)),
                 "median_trust": float(np.median(clean_scores.trust))}
    if clean.y is not None:
        right = clean_scores.label == clean.y
        n_right = int(right.sum())
        if n_right == 0:
            raise UsageError(f"{clean.path}: the model classifies none of the {len(right)} clean samples as y says: "
                             "check that y holds this model's class indices and that x is scaled like its input")
        s_in = clean_scores.score[right]
        wrong = clean_scores.score[~right]
        out_clean.update(positives="correctly classified clean samples", n_positives=n_right,
                         accuracy=n_right / len(right), flag_rate_right=float(np.mean(clean_scores.flagged[right])),
                         flag_rate_wrong=(float(np.mean(clean_scores.flagged[~right])) if wrong.size else None))
        if wrong.size:
            out_clean["misclassification"] = {
                "auroc": auroc(s_in, wrong), "aurc": aurc(s_in, wrong),
                "risk_at_95_coverage": risk_at_coverage(s_in, wrong, COVERAGE), "n_right": n_right,
                "n_wrong": int(wrong.size)}
        else:
            out_clean["misclassification"] = None
    else:
        s_in = clean_scores.score
        out_clean.update(positives="all clean samples", n_positives=len(s_in))
    out_sets = {}
    for ds, sc in sets:
        out_sets[ds.name] = {"file": str(ds.path), "n": len(ds.x), "n_file": ds.n_file,
                             **detection_metrics(s_in, sc.score), "flag_rate": float(np.mean(sc.flagged)),
                             "median_trust": float(np.median(sc.trust))}
    return {"clean": out_clean, "sets": out_sets}


def roc_points(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the rules ``score >= t`` over every distinct score, OOD positive, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([s_in, s_out]))[::-1]
    si, so = np.sort(s_in), np.sort(s_out)
    fpr = (len(si) - np.searchsorted(si, thresholds, side="left")) / len(si)
    tpr = (len(so) - np.searchsorted(so, thresholds, side="left")) / len(so)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


# --------------------------------------------------------------------------- figures


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UsageError(MATPLOTLIB_HINT) from exc
    return Figure


def _file_name(prefix: str, name: str) -> str:
    return f"{prefix}_{name}.png"


def draw_figures(out: Path, clean_in: np.ndarray, clean: SetScores, sets: list[tuple[DataSet, SetScores]],
                 results: dict, alpha: float, class_names: list[str],
                 detector_label: str) -> tuple[list[str], list[str]]:
    """roc.png, trust_<set>.png, csm_<set>.png; returns (file names, notes)."""
    Figure = _figure_class()
    files, notes = [], []

    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    for ds, sc in sets:
        fpr, tpr = roc_points(clean_in, sc.score)
        ax.plot(fpr, tpr, lw=1.6, label=f"{ds.name} (AUROC {results['sets'][ds.name]['auroc']:.4f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (in-distribution flagged)",
           ylabel="true positive rate (set detected)", title=f"ROC: {detector_label}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    files.append("roc.png")

    bins = np.linspace(0.0, 1.0, 41)
    for ds, sc in sets:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        for name, trust, flagged, color in ((CLEAN, clean.trust, clean.flagged, "tab:blue"),
                                            (ds.name, sc.trust, sc.flagged, "tab:red")):
            ax.hist(trust, bins=bins, weights=np.full(len(trust), 1.0 / len(trust)), alpha=0.55, color=color,
                    label=f"{name} (n={len(trust)}, flagged {np.mean(flagged):.1%})")
        ax.axvline(alpha, color="black", ls="--", lw=1, label=f"alpha = {alpha:g}")
        ax.set(xlim=(0, 1), xlabel="trust (conformal p-value; flagged when < alpha)", ylabel="fraction of the set",
               title=f"trust: {CLEAN} vs {ds.name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fname = _file_name("trust", ds.name)
        fig.savefig(out / fname, dpi=110)
        files.append(fname)

    for name, sc in ((CLEAN, clean), *((ds.name, sc) for ds, sc in sets)):
        if sc.csm is None:
            notes.append(f"no CSM example for {name}: the detector returns no CSM (e.g. a composite without the "
                         "GGA component)")
            continue
        n = sc.csm.shape[0]
        ticks = [(class_names[c] if c < len(class_names) else str(c)) for c in sc.csm_classes[:n]]
        ticks += [f"#{i + 1}" for i in range(len(ticks), n)]
        fig = Figure(figsize=(5.2, 4.6))
        ax = fig.subplots()
        im = ax.imshow(sc.csm, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), ticks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), ticks, fontsize=8)
        if n <= 10:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{sc.csm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(sc.csm[i, j]) > 0.6 else "black")
        ax.set_title(f"{name}, sample 0: predicted {ticks[0]}, trust {sc.trust[0]:.3g}"
                     + (" (flagged)" if sc.flagged[0] else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
        fig.tight_layout()
        fname = _file_name("csm", name)
        fig.savefig(out / fname, dpi=110)
        files.append(fname)
    return files, notes


# --------------------------------------------------------------------------- report


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def render_markdown(doc: dict) -> str:
    det, clean, sets = doc["detector"], doc["clean"], doc["sets"]
    alpha = det["alpha"]
    n_clean = f"{clean['n']} ({clean['n_positives']} right)" if clean["labels"] else str(clean["n"])
    where = f"in this process from {det['path']}" if doc["mode"] == "detector" else f"by the service at {det['url']}"
    lines = [
        "# gga-eval report", "",
        f"- date: {doc['date']}",
        f"- command: `{doc['command']}`",
        f"- detector: kind {det['kind']}, preset {det.get('preset')}, version {det.get('version')}, "
        f"alpha {alpha:g} ({det['alpha_source']}); components {', '.join(det.get('components') or [])}",
        f"- scored {where} (model {doc['model']}, device {doc['device']}), batch size {doc['batch_size']}, "
        f"{doc['wall_seconds']:.1f} s",
        f"- {POSITIVES_LABELLED if clean['labels'] else POSITIVES_UNLABELLED}; scores: higher = more anomalous; "
        "OOD = positive class of AUROC and AUPR-Out; TNR at 95% TPR = share of the set flagged at the score "
        "threshold that accepts 95% of the in-distribution samples",
        "",
        f"| set | file | n | AUROC | AUPR-In | AUPR-Out | TNR at 95% TPR | flag rate (trust < {alpha:g}) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {CLEAN} (in-distribution) | `{clean['file']}` | {n_clean} | — | — | — | — | {clean['flag_rate']:.4f} |",
    ]
    for name, r in sets.items():
        lines.append(f"| {name} | `{r['file']}` | {r['n']} | {_f(r['auroc'])} | {_f(r['aupr_in'])} | "
                     f"{_f(r['aupr_out'])} | {_f(r['tnr_at_95_tpr'])} | {r['flag_rate']:.4f} |")
    lines.append("")
    lines.append(f"On in-distribution data the expected flag rate is at most alpha = {alpha:g} (trust is a conformal "
                 "p-value, not the probability that a prediction is right).")
    if clean["labels"]:
        m = clean.get("misclassification")
        lines += ["", "## Misclassification (clean set, wrong vs right predictions)", "",
                  f"Accuracy {clean['accuracy']:.4f} ({clean['n_positives']} of {clean['n']} right); flag rate "
                  f"{clean['flag_rate_right']:.4f} on the right ones"
                  + (f", {clean['flag_rate_wrong']:.4f} on the wrong ones." if clean["flag_rate_wrong"] is not None
                     else "."), ""]
        if m is None:
            lines.append("No clean sample is misclassified: the misclassification metrics are undefined.")
        else:
            lines += ["| accuracy | AUROC wrong vs right | AURC | risk at 95% coverage | right | wrong |",
                      "|---|---|---|---|---|---|",
                      f"| {clean['accuracy']:.4f} | {m['auroc']:.4f} | {m['aurc']:.4f} | "
                      f"{m['risk_at_95_coverage']:.4f} | {m['n_right']} | {m['n_wrong']} |", "",
                      "AURC and risk: accept the lowest scores first; lower is better."]
    lines += ["", "## Figures", "", "ROC curves of every set against the in-distribution samples:", "",
              "![ROC curves](roc.png)", ""]
    figs = set(doc["figures"])
    if f"csm_{CLEAN}.png" in figs:
        lines += [f"### {CLEAN}", "", f"![CSM example {CLEAN}](csm_{CLEAN}.png)", ""]
    for name in sets:
        lines += [f"### {name}", "", f"![trust {CLEAN} vs {name}](trust_{name}.png)"]
        if f"csm_{name}.png" in figs:
            lines += ["", f"![CSM example {name}](csm_{name}.png)"]
        lines.append("")
    lines.append("CSM examples: the first sample of each set, rows and columns in the order of the predicted "
                 "classes (the predicted class first).")
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    lines += ["", "Every number, unrounded, is in `report.json`; the per-sample scores are in `scores.npz`.", ""]
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run ``gga-eval`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        doc = run(args, argv)
    except UsageError as exc:
        print(f"gga-eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EvalFailed as exc:
        print(f"gga-eval: evaluation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - anything unforeseen is a failure, not a traceback
        log.debug("gga-eval failed", exc_info=True)
        print(f"gga-eval: evaluation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"gga-eval: report written to {doc['report']}", file=sys.stderr)
    return EXIT_OK


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Everything after argument parsing; raises :class:`UsageError` or :class:`EvalFailed`."""
    t0 = time.perf_counter()
    names = [name for name, _ in args.ood]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--ood names must be unique; repeated: {', '.join(dupes)}")
    for path in (args.clean, *(p for _, p in args.ood)):
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    _figure_class()  # fail before any scoring when matplotlib is missing

    scorer = LocalScorer(args) if args.detector is not None else RemoteScorer(args)
    try:
        n_classes = len(scorer.class_names)
        clean = load_set(CLEAN, args.clean, scorer.input_shape, n_classes, args.max_samples, with_labels=True)
        ood = [load_set(name, path, scorer.input_shape, n_classes, args.max_samples, with_labels=False)
               for name, path in args.ood]
        notes = []
        for ds in (clean, *ood):
            notes += scorer.check(ds)
        progress = not args.no_progress
        clean_scores = score_set(scorer, clean, args.batch_size, progress)
        scored = []
        for ds in ood:
            scored.append((ds, score_set(scorer, ds, args.batch_size, progress)))
    finally:
        scorer.close()

    for name, sc in ((CLEAN, clean_scores), *((ds.name, sc) for ds, sc in scored)):
        if sc.nonfinite_scores:
            notes.append(f"{name}: the service returned no finite score for {sc.nonfinite_scores} sample(s); they "
                         "count as the most anomalous")
        if sc.range_warnings:
            notes.append(f"{name}: the service warned that {sc.range_warnings} sample(s) lie outside the model "
                         "card's value range (scored anyway)")
    for ds in (clean, *ood):
        if len(ds.x) < ds.n_file:
            notes.append(f"{ds.name}: the first {len(ds.x)} of {ds.n_file} samples (--max-samples)")

    results = evaluate(clean, clean_scores, scored)
    right = clean_scores.label == clean.y if clean.y is not None else np.ones(len(clean.x), bool)
    det = scorer.info
    label = f"{det['kind']} {det.get('version') or ''}".strip()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        figures, fig_notes = draw_figures(args.out, clean_scores.score[right], clean_scores, scored, results,
                                          scorer.alpha, scorer.class_names, label)
        notes += fig_notes
        doc = {
            "tool": "gga-eval", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["gga-eval", *argv]), "mode": scorer.mode, "model": scorer.model_name,
            "device": scorer.device_name, "batch_size": args.batch_size, "max_samples": args.max_samples,
            "detector": det, "tpr": TPR, "coverage": COVERAGE, **results, "figures": figures, "notes": notes,
            "wall_seconds": round(time.perf_counter() - t0, 3),
        }
        arrays = {}
        for name, sc in ((CLEAN, clean_scores), *((ds.name, sc) for ds, sc in scored)):
            arrays.update({f"{name}.score": sc.score, f"{name}.trust": sc.trust, f"{name}.flagged": sc.flagged,
                           f"{name}.label": sc.label})
        if clean.y is not None:
            arrays[f"{CLEAN}.y"] = clean.y
        np.savez(args.out / "scores.npz", **arrays)
        (args.out / "report.json").write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
        (args.out / "report.md").write_text(render_markdown(doc))
    except OSError as exc:
        raise EvalFailed(f"cannot write the report into {args.out}: {exc}") from exc
    doc["report"] = str(args.out / "report.md")
    return doc


if __name__ == "__main__":
    sys.exit(main())
