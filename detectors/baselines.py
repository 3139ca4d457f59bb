"""The OOD baselines GGA is compared against, one file each (re-exported here).

MSP (:mod:`detectors.msp`), energy (:mod:`detectors.energy`), ODIN
(:mod:`detectors.odin`) and single-layer Mahalanobis (:mod:`detectors.mahalanobis`);
each is a :class:`detectors.base.Detector` (:class:`detectors.base.BaselineDetector`:
``fit(x, y, calibration=x_cal)`` adds the conformal calibration, ``score(x)`` returns
``Scores``). ``anomaly_score(x)``: the raw scores, float64 [B] on the CPU, higher = more
anomalous.
"""

from detectors.base import BaselineDetector, Detector, model_device
from detectors.energy import Energy, energy_score
from detectors.mahalanobis import Mahalanobis, mahalanobis_distances, mahalanobis_min_distance
from detectors.msp import MSP, msp_score
from detectors.odin import ODIN

__all__ = [
    "MSP",
    "ODIN",
    "BaselineDetector",
    "Detector",
    "Energy",
    "Mahalanobis",
    "energy_score",
    "mahalanobis_distances",
    "mahalanobis_min_distance",
    "model_device",
    "msp_score",
]
