"""Trust scores for a fixed classifier: Geometric Gradient Analysis (GGA), the composite built on it, baselines.

The default the service serves is the composite (GGA's CSM features, logit signals and
per-layer Mahalanobis distances, combined and calibrated conformally)::

    from detectors import build_detector, load_detector
    det = build_detector("composite", model, num_classes=10, alpha=0.05)
    det.fit(x_train, y_train, calibration=(x_cal, y_cal))   # held-out data for the calibration
    out = det.score(x)          # out.trust, out.flagged, out.label, out.score, ...
    det.save("my-detector")
    same = load_detector("my-detector", model)               # any kind, checked against the weights

GGA alone (Schwinn et al. 2021)::

    from detectors import GGADetector
    det = GGADetector(model, top_n=None, alpha=0.05).fit(x_train, y_train)
    out = det.score(x)

Every detector, the baselines (MSP, Energy, ODIN, Mahalanobis) included, follows one
contract, :class:`Detector` (:mod:`detectors.base`): ``fit``, ``score -> Scores``,
``state_dict``/``load_state_dict``, ``metadata``, ``save``/``load``, ``kind``,
``components``, ``alpha``, ``threshold``. Every fit with labelled calibration data also fits
prediction sets and a selective gate (:mod:`detectors.decisions`): ``out.prediction_set`` (bool
[B, C]) and ``out.accept`` (bool [B], False whenever flagged).
"""

from detectors.base import BaselineDetector, Detector, DetectorBase, Scores
from detectors.baselines import MSP, ODIN, Energy, Mahalanobis, energy_score, msp_score
from detectors.calibration import ConformalCalibration, conformal_p_values, conformal_threshold
from detectors.composite import CompositeConfig, CompositeDetector
from detectors.csm import CSMResult, cosine_similarity_maps, cosine_similarity_matrix
from detectors.decisions import DecisionConfig, Decisions
from detectors.features import FEATURE_NAMES, csm_features, gga_features
from detectors.fingerprint import model_fingerprint
from detectors.gga import FitStats, GGAConfig, GGADetector, GGAScores
from detectors.loda import LODA
from detectors.persist import DETECTORS, detector_class, load_detector
from detectors.presets import DEFAULT_PRESET, PRESETS, build_detector, describe
from detectors.storage import FingerprintMismatchError, WrongDetectorKindError

__all__ = [
    "CSMResult",
    "DEFAULT_PRESET",
    "DETECTORS",
    "DecisionConfig",
    "Decisions",
    "FEATURE_NAMES",
    "LODA",
    "MSP",
    "ODIN",
    "PRESETS",
    "BaselineDetector",
    "CompositeConfig",
    "CompositeDetector",
    "ConformalCalibration",
    "Detector",
    "DetectorBase",
    "Energy",
    "FingerprintMismatchError",
    "FitStats",
    "GGAConfig",
    "GGADetector",
    "GGAScores",
    "Mahalanobis",
    "Scores",
    "WrongDetectorKindError",
    "build_detector",
    "conformal_p_values",
    "conformal_threshold",
    "cosine_similarity_maps",
    "cosine_similarity_matrix",
    "csm_features",
    "describe",
    "detector_class",
    "energy_score",
    "gga_features",
    "load_detector",
    "model_fingerprint",
    "msp_score",
]
