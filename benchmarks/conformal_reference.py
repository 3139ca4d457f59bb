"""The reference side of benchmarks/conformal_sets.py: TorchCP and MAPIE on the same logits and splits.

Runs in its own environment (numpy, torch, mapie, torchcp; nothing of this project is imported):

    /work/venv-cp/bin/python benchmarks/conformal_reference.py <cache-dir>

Reads ``<cache>/conformal_ref_in.npz`` (written by benchmarks/conformal_sets.py: per data set the
float32 logits, labels, the calibration / test indices, the RAPS calibration indices and (k_reg, λ))
and writes ``<cache>/conformal_ref_out.npz``: for every data set, α and method, the bool set mask on
the test indices and the threshold q̂. TorchCP's scores are taken with ``randomized=False`` (its
default is randomised) on float64 logits; MAPIE's classifier is a prefit estimator whose
predict_proba is the float64 softmax of the logits it is given as features.

The environment (kept apart: TorchCP's imports pull transformers and torch_geometric):

    python3 -m venv /work/venv-cp
    /work/venv-cp/bin/pip install torch==2.13.0 numpy mapie==1.6.0
    /work/venv-cp/bin/pip install --only-binary :all: torchcp==1.2.0 tqdm torch_geometric transformers

TorchCP 1.2 imports ``torchsort`` (a C++ extension with no wheel) in a training loss module that
this script never uses; a module that raises on use stands in for it so the package imports.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch


def _stand_in_torchsort() -> None:
    def unavailable(*_a, **_k):
        raise RuntimeError("torchsort is not installed (only TorchCP's uncertainty-aware loss needs it)")

    mod = types.ModuleType("torchsort")
    mod.soft_rank = mod.soft_sort = unavailable
    sys.modules.setdefault("torchsort", mod)


class _SoftmaxOfLogits:
    """A prefit scikit-learn-style classifier: X = logits [n, C], predict_proba = softmax in float64."""

    _estimator_type = "classifier"

    def __init__(self, num_classes: int) -> None:
        self.classes_ = np.arange(num_classes)
        self.n_features_in_ = num_classes

    def fit(self, x, y):
        return self

    def predict_proba(self, x):
        z = np.asarray(x, dtype=np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x):
        return self.predict_proba(x).argmax(axis=1)

    def get_params(self, deep=True):
        return {"num_classes": len(self.classes_)}

    def set_params(self, **params):
        return self

    def __sklearn_is_fitted__(self):
        return True


def torchcp_sets(score: str, z_cal, y_cal, z_test, alpha: float, k_reg: int, lam: float):
    from torchcp.classification.predictor import SplitPredictor
    from torchcp.classification.score import APS, LAC, RAPS

    fn = {"lac": lambda: LAC(), "aps": lambda: APS(randomized=False),
          "raps": lambda: RAPS(randomized=False, penalty=lam, kreg=k_reg)}[score]()
    pred = SplitPredictor(fn, alpha=alpha, device=torch.device("cpu"))
    pred.calculate_threshold(torch.from_numpy(z_cal), torch.from_numpy(y_cal), alpha)
    mask = pred.predict_with_logits(torch.from_numpy(z_test)).bool().numpy()
    return mask, float(pred.q_hat)


def mapie_sets(score: str, z_cal, y_cal, z_test, alpha: float):
    from mapie.classification import SplitConformalClassifier

    clf = SplitConformalClassifier(_SoftmaxOfLogits(z_cal.shape[1]), confidence_level=1 - alpha,
                                   conformity_score=score, prefit=True, random_state=0)
    clf.conformalize(z_cal, y_cal)
    _, sets = clf.predict_set(z_test)
    return sets[:, :, 0].astype(bool)


def main(cache: Path) -> None:
    _stand_in_torchsort()
    torch.set_num_threads(1)
    data = np.load(cache / "conformal_ref_in.npz")
    plan = json.loads(str(data["plan"]))
    out, notes = {}, []
    for ds in plan["datasets"]:
        z = data[f"{ds}_logits"].astype(np.float64)
        y = data[f"{ds}_labels"].astype(np.int64)
        cal, test = data[f"{ds}_cal"], data[f"{ds}_test"]
        for alpha in plan["alphas"]:
            raps_cal = data[f"{ds}_{alpha}_raps_cal"]
            k_reg, lam = plan["raps"][ds][str(alpha)]
            for score in ("lac", "aps", "raps"):
                idx = raps_cal if score == "raps" else cal
                mask, q = torchcp_sets(score, z[idx], y[idx], z[test], alpha, k_reg, lam)
                out[f"{ds}|{alpha}|torchcp|{score}"] = mask
                out[f"{ds}|{alpha}|torchcp|{score}|q"] = np.array([q])
            for score in ("lac", "aps"):
                try:
                    out[f"{ds}|{alpha}|mapie|{score}"] = mapie_sets(score, z[cal], y[cal], z[test], alpha)
                except Exception as exc:  # noqa: BLE001 - reported, the comparison goes on without it
                    notes.append(f"mapie {score} on {ds} at alpha {alpha}: {type(exc).__name__}: {exc}")
    import mapie
    import torchcp

    meta = {"torchcp": torchcp.__version__, "mapie": mapie.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "notes": notes}
    np.savez(cache / "conformal_ref_out.npz", meta=json.dumps(meta), **out)
    print(json.dumps(meta))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
