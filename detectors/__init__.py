"""Geometric Gradient Analysis (GGA): per-class gradient geometry, LODA and calibrated trust.

Usable without the service::

    from detectors import GGADetector
    det = GGADetector(model, top_n=None, alpha=0.05).fit(x_train, y_train)
    out = det.score(x)          # out.trust, out.flagged, out.label, ...
"""

from detectors.calibration import conformal_p_values, conformal_threshold
from detectors.csm import CSMResult, cosine_similarity_maps, cosine_similarity_matrix
from detectors.features import FEATURE_NAMES, csm_features, gga_features
from detectors.fingerprint import model_fingerprint
from detectors.gga import FingerprintMismatchError, FitStats, GGAConfig, GGADetector, GGAScores
from detectors.loda import LODA

__all__ = [
    "CSMResult",
    "FEATURE_NAMES",
    "FingerprintMismatchError",
    "FitStats",
    "GGAConfig",
    "GGADetector",
    "GGAScores",
    "LODA",
    "conformal_p_values",
    "conformal_threshold",
    "cosine_similarity_maps",
    "cosine_similarity_matrix",
    "csm_features",
    "gga_features",
    "model_fingerprint",
]
