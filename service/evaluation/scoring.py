"""Scoring the sets of ``gga-eval``: in this process or through a running service.

A scorer has ``input_shape``, ``class_names``, ``alpha`` (a sample is flagged when
trust < alpha), ``info`` (the detector as the report names it), ``model_name``,
``device_name``, ``mode`` (``detector`` or ``url``), and ``check(set) -> notes``,
``score(x, return_csm) -> dict of arrays``, ``close()``:

- :class:`LocalScorer`: a saved detector folder, the model named as for the server (one
  :class:`Settings` from the ``GGA_*`` environment and the command's overrides);
- :class:`RemoteScorer`: a service, through :class:`service.client.GGAClient` (``/info``
  with the read token, then ``/predict``).

:func:`score_set` scores one set in batches (the first with its CSM) into a :class:`SetScores`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field

import httpx
import numpy as np

from service.client import BadRequest, GGAClient, GGAError, Unauthorized
from service.evaluation.data import DataSet
from service.evaluation.errors import EvalFailed, UsageError

log = logging.getLogger("service.evalcli")


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
    p_values: np.ndarray | None = None  # with --explain: (n, K), each detector component's p-value per sample
    prediction_set: list[list[int]] | None = None  # each sample's conformal set (None: the detector has none)
    accept: np.ndarray | None = None  # bool, the selective gate (None: the detector has no gate)
    confidence: np.ndarray | None = None  # float64, softmax probability of the predicted class
    logits: np.ndarray | None = None  # (n, C) the logits the detector's decisions saw (in this process only)


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
        self.decisions = getattr(self.detector, "decisions", None)
        self._logits: list = []
        decide = getattr(self.detector, "decide", None)
        if decide is not None:  # keep the logits of the detector's own pass, as its decisions saw them
            def keep_logits(scores, logits, _decide=decide):
                self._logits.append(torch.as_tensor(logits).detach().cpu())
                return _decide(scores, logits)

            self.detector.decide = keep_logits

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

    def score(self, x: np.ndarray, return_csm: bool, explain: bool = False) -> dict:
        from service.explain import component_p_values

        self._logits.clear()
        out = self.detector.score(self._torch.from_numpy(x).to(self.device), return_csm=return_csm)
        logits = self._torch.cat(self._logits).numpy() if self._logits else None
        self._logits.clear()
        trust = out.trust.double().numpy()
        comps = component_p_values(self.detector, out) if explain else None
        flagged = trust < self.alpha
        sets = None if out.prediction_set is None else [np.flatnonzero(m).tolist() for m in out.prediction_set.numpy()]
        accept = None if out.accept is None else out.accept.numpy() & ~flagged  # as the server: never when flagged
        return {"p_values": None if comps is None else _p_matrix(comps),
                "label": out.label.numpy().astype(np.int64), "score": out.score.double().numpy(), "trust": trust,
                "flagged": flagged, "top_classes": out.top_classes.numpy(),
                "csm": None if out.csm is None else out.csm.float().numpy(), "prediction_set": sets, "accept": accept,
                "confidence": out.confidence.double().numpy(),
                "logits": logits if logits is not None and len(logits) == len(x) else None}

    def close(self) -> None:
        pass


class RemoteScorer:
    """A running service, through the Python client."""

    mode = "url"

    def __init__(self, args: argparse.Namespace) -> None:
        for flag in ("model", "model_weights", "model_card", "device"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} names the model of --detector; with --url the "
                                 "service's own model is used")
        self.url = args.url.rstrip("/")
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise UsageError(f"--url {args.url!r}: expected http://host:port or https://host:port")
        self.client = GGAClient(self.url, read_token=args.read_token, timeout=args.timeout)
        try:
            info = self.client.info()
        except httpx.HTTPError as exc:
            self.client.close()
            raise EvalFailed(f"cannot reach the service at {self.url}: {type(exc).__name__}: {exc}") from exc
        except Unauthorized as exc:
            self.client.close()
            which = "was refused" if args.read_token else "is needed"
            raise EvalFailed(f"{self.url}/info answered {exc}: the service has a read token and this one {which} "
                             "(--read-token, or GGA_READ_TOKEN in the environment)") from exc
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
        self.decisions = None  # the fitted state stays on the service: /info shows its settings only
        self._set = ""

    def check(self, ds: DataSet) -> list[str]:
        self._set = f"{ds.name} ({ds.path})"
        return []

    def score(self, x: np.ndarray, return_csm: bool, explain: bool = False) -> dict:
        try:
            res = self.client.predict(x, return_csm=return_csm, explain=explain)
        except BadRequest as exc:
            raise UsageError(f"the service refused samples of {self._set}: {exc.status} {exc.type}: {exc.message}"
                             + (" (lower --batch-size)" if exc.status == 413 else "")) from exc
        except GGAError as exc:
            raise EvalFailed(f"/predict failed for {self._set}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise EvalFailed(f"/predict failed for {self._set}: {type(exc).__name__}: {exc}") from exc
        if len(res) != len(x):
            raise EvalFailed(f"/predict answered {len(res)} rows for {len(x)} samples of {self._set}")
        return {"p_values": res.p_values, "label": res.labels, "score": res.score, "trust": res.trust,
                "flagged": res.flagged,
                "top_classes": res.top_classes, "csm": res.csm, "warnings": len(res.warnings),
                "prediction_set": res.prediction_set, "accept": res.accept, "confidence": res.confidence}

    def close(self) -> None:
        self.client.close()


def _p_matrix(rows: list[list[dict]]) -> np.ndarray:
    return np.array([[np.nan if c["p_value"] is None else c["p_value"] for c in r] for r in rows], dtype=np.float64)


def score_set(scorer, ds: DataSet, batch_size: int, progress: bool, explain: bool = False) -> SetScores:
    """Score ``ds`` in batches (the first batch with its CSM), with a progress bar on stderr; ``explain``:
    each detector component's p-value per sample too."""
    from service.fitcli import ProgressBar

    bar = ProgressBar(sys.stderr, label=f"scoring {ds.name}") if progress else None
    parts: list[dict] = []
    n = len(ds.x)
    try:
        for start in range(0, n, batch_size):
            parts.append(scorer.score(ds.x[start:start + batch_size], return_csm=(start == 0), explain=explain))
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
        nonfinite_scores=nonfinite, range_warnings=sum(p.get("warnings", 0) for p in parts),
        p_values=np.concatenate([p["p_values"] for p in parts]) if explain and all(
            p.get("p_values") is not None for p in parts) else None,
        prediction_set=None if any(p.get("prediction_set") is None for p in parts)
        else [s for p in parts for s in p["prediction_set"]],
        accept=None if any(p.get("accept") is None for p in parts) else np.concatenate([p["accept"] for p in parts]),
        confidence=_joined(parts, "confidence", np.float64), logits=_joined(parts, "logits", None))


def _joined(parts: list[dict], key: str, dtype) -> np.ndarray | None:
    """The batches' ``key`` arrays as one, or None when a batch has none."""
    if any(p.get(key) is None for p in parts):
        return None
    out = np.concatenate([np.asarray(p[key]) for p in parts])
    return out if dtype is None else out.astype(dtype)
