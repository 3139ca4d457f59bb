"""The drift alarm (README "Drift alarm"): Prometheus rules in docker/prometheus/rules/,
the same groups as a Kubernetes PrometheusRule, and the Grafana panel's queries.

On in-distribution traffic the k flagged rows among n scored rows are Binomial(n, q), where
q, the flag probability the detector's m calibration scores give it, is itself random over
calibration draws: Beta(c, m + 1 - c) with c = ceil(alpha (m + 1) - 1), mean at most alpha,
variance about alpha (1 - alpha) / (m + 2). The alert fires when
k/n > alpha + z sqrt(alpha (1 - alpha) (1/n + 1/m)) with z = 3.09 (one-sided 0.001 per
evaluation over calibration draws and traffic, normal approximation) and n alpha >= 10,
for 5 minutes.

Two evaluators check the rules on the same series (docker/prometheus/tests/gga-drift.test.yml):
``promtool test rules`` (skipped where promtool is absent; .ci/run installs Debian's
``prometheus`` package, which ships it) and a small Python evaluator here, which mirrors
the pinned rule expressions (``increase`` with Prometheus' extrapolation, the sums by job,
the bound, the ``for`` state machine) and so tests the logic without promtool. Exact
numbers: the bound on given counter values, the exact false-alarm rates (binomial given q,
beta-binomial over calibration draws, checked by a grid over q and by simulating the
detector's conformal threshold), the service's own counters and calibration-size gauge
after clean and out-of-distribution requests.
"""

from __future__ import annotations

import fnmatch
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.test_docker_files import _compose, _exposed_sample_names, _host_mounts

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
RULES = DOCKER / "prometheus" / "rules" / "gga-drift.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
K8S_RULES = DOCKER / "k8s" / "prometheus-rules.yaml"
PROMTOOL_TEST = DOCKER / "prometheus" / "tests" / "gga-drift.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian's prometheus package ships it; .ci/run puts it in "
    "the CI venv); the Python evaluator tests still check the rules")

# The documented constants (the rules file is the one place they are set; pinned here).
WINDOW_S = 15 * 60
Z = 3.09
MIN_EXPECTED_FLAGS = 10  # n * alpha >= 10: at alpha = 0.05, n >= 200
FOR_S = 5 * 60
ALERT = "GGAFlagRateAboveAlpha"

# What the Python evaluator implements; a change to the rules must change this too.
EXPECTED_EXPRS = {
    "gga:alpha": "max by (job) (gga_alpha)",
    "gga:calibration_size": "max by (job) (gga_calibration_size)",
    "gga:rows:increase15m": "sum by (job) (increase(gga_rows_total[15m]))",
    "gga:flagged:increase15m": "sum by (job) (increase(gga_flagged_total[15m]))",
    "gga:flag_rate:ratio15m": "gga:flagged:increase15m / gga:rows:increase15m",
    "gga:flag_rate:bound15m": "gga:alpha + 3.09 * sqrt(gga:alpha * (1 - gga:alpha) * (1 / gga:rows:increase15m"
                              " + 1 / gga:calibration_size))",
    ALERT: "gga:flag_rate:ratio15m > gga:flag_rate:bound15m and gga:rows:increase15m * gga:alpha >= 10",
}


# The accept-rate group (gga-accept): a falling accept rate of the selective gate is a drift signal.
ACCEPT_ALERT = "GGAAcceptRateBelowCalibration"
ACCEPT_EXPRS = {
    "gga:accept_expected": "max by (job) (gga_accept_rate_calibration)",
    "gga:gate_calibration_size": "max by (job) (gga_gate_calibration_size)",
    "gga:gated:increase15m": "sum by (job) (increase(gga_gated_rows_total[15m]))",
    "gga:accepted:increase15m": "sum by (job) (increase(gga_accepted_total[15m]))",
    "gga:accept_rate:ratio15m": "gga:accepted:increase15m / gga:gated:increase15m",
    "gga:accept_rate:bound15m": "gga:accept_expected - 3.09 * sqrt(gga:accept_expected * (1 - gga:accept_expected)"
                                " * (1 / gga:gated:increase15m + 1 / gga:gate_calibration_size))",
    ACCEPT_ALERT: "gga:accept_rate:ratio15m < gga:accept_rate:bound15m and gga:gated:increase15m * (1 - "
                  "gga:accept_expected) >= 10",
}


def accept_bound(p: float, n: float, m: float, z: float = Z) -> float:
    """gga:accept_rate:bound15m: the lowest in-distribution accept rate at the stated false-alarm rate."""
    return p - z * math.sqrt(p * (1 - p) * (1 / n + 1 / m))


def accept_alarm(p: float, n: float, accepted: float, m: float) -> bool:
    return accepted / n < accept_bound(p, n, m) and n * (1 - p) >= MIN_EXPECTED_FLAGS


# --- the rule logic in Python ------------------------------------------------------------


def bound(alpha: float, n: float, m: float, z: float = Z) -> float:
    """gga:flag_rate:bound15m on n scored rows and m calibration scores: the largest in-distribution
    flag rate at the stated false-alarm rate (the same float operations, in the same order, as PromQL)."""
    return alpha + z * math.sqrt(alpha * (1 - alpha) * (1 / n + 1 / m)) if n > 0 else math.inf


def old_bound(alpha: float, n: float, z: float = Z) -> float:
    """The bound before the calibration term: traffic's randomness only."""
    return alpha + z * math.sqrt(alpha * (1 - alpha) / n)


def alarm(alpha: float, n: float, k: float, m: float) -> bool:
    """The GGAFlagRateAboveAlpha condition (before its ``for``) on n scored, k flagged rows, m calibration scores."""
    if n <= 0:
        return False  # 0/0 is NaN in PromQL: no comparison holds
    return k / n > bound(alpha, n, m) and n * alpha >= MIN_EXPECTED_FLAGS


def _normal_upper_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def _binomial_upper_tail(n: int, p: float, k: int) -> float:
    """P(K >= k) for K ~ Binomial(n, p), exact up to float rounding (terms in log space)."""
    log_pmf = (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
               + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1))
    return math.fsum(math.exp(v) for v in log_pmf)


def _first_alarm(n: int, bound_value: float) -> int:
    """The smallest k with k / n > bound_value."""
    return math.floor(bound_value * n) + 1


def _flag_probability_law(alpha: float, m: int) -> tuple[int, int]:
    """(a, b) of the Beta law of q, the in-distribution flag probability, over draws of m calibration scores.

    detectors.calibration: trust < alpha iff the score is above the c-th largest of the m calibration
    scores, c = ceil(alpha (m + 1) - 1); for continuous scores q = 1 - F(that score), the c-th largest
    of m uniforms subtracted from 1: Beta(c, m + 1 - c), mean c / (m + 1) <= alpha (ties only lower q).
    """
    c = math.ceil(alpha * (m + 1) - 1 - 1e-12)  # as conformal_threshold
    return c, m + 1 - c


def _beta_binomial_upper_tail(n: int, a: float, b: float, k: int) -> float:
    """P(K >= k) for K ~ Binomial(n, q), q ~ Beta(a, b): exact up to float rounding (terms in log space)."""
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    log_pmf = (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + math.lgamma(i + a)
               + math.lgamma(n - i + b) - math.lgamma(n + a + b) - log_beta for i in range(k, n + 1))
    return math.fsum(math.exp(v) for v in log_pmf)


def _false_alarm_given_q(n: int, q: float, bound_value: float) -> float:
    """P(alarm) per evaluation for a detector whose flag probability is q: P(K > bound * n), K ~ Binomial(n, q)."""
    return _binomial_upper_tail(n, q, _first_alarm(n, bound_value))


def _false_alarm_marginal(n: int, alpha: float, m: int, bound_value: float) -> float:
    """P(alarm) per evaluation over calibration draws (q ~ its Beta law) and traffic: a beta-binomial tail."""
    return _beta_binomial_upper_tail(n, *_flag_probability_law(alpha, m), _first_alarm(n, bound_value))


def _false_alarm_marginal_grid(n: int, alpha: float, m: int, bound_value: float, points: int = 2001) -> float:
    """The same integral over q done numerically: the Beta density times the binomial tail on a grid
    of q (trapezoids, +-12 sd around alpha), numpy only."""
    a, b = _flag_probability_law(alpha, m)
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    q = np.linspace(max(alpha - 12 * sd, 1e-9), alpha + 12 * sd, points)
    log_density = (a - 1) * np.log(q) + (b - 1) * np.log1p(-q) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    ks = np.arange(_first_alarm(n, bound_value), n + 1)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in ks])
    tail = np.empty_like(q)
    for lo in range(0, points, 250):  # bounded memory: 250 q values at a time
        qs = q[lo:lo + 250, None]
        tail[lo:lo + 250] = np.exp(log_choose + ks * np.log(qs) + (n - ks) * np.log1p(-qs)).sum(axis=1)
    f = np.exp(log_density) * tail
    return float(np.sum((f[1:] + f[:-1]) * np.diff(q)) / 2)  # trapezoids (np.trapezoid needs numpy 2)


# --- a small evaluator of the rules on promtool's input series ----------------------------


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    samples: list[tuple[float, float]]  # (t seconds, value)


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    assert m, f"unsupported duration {text!r}"
    return int(m[1]) * units[m[2]]


def _expand(values: str) -> list[float | None]:
    """promtool's expanding notation: 'a+bxn' (n + 1 values), 'a-bxn', 'a', '_', '_xn'."""
    out: list[float | None] = []
    for token in values.split():
        if m := re.fullmatch(r"_x(\d+)", token):
            out.extend([None] * int(m[1]))
        elif token == "_":
            out.append(None)
        elif m := re.fullmatch(r"(-?[\d.]+)([+-])([\d.]+)x(\d+)", token):
            start, step = float(m[1]), float(m[3]) * (1 if m[2] == "+" else -1)
            out.extend(start + i * step for i in range(int(m[4]) + 1))
        else:
            out.append(float(token))
    return out


def _selector(text: str) -> tuple[str, dict[str, str]]:
    m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*", text)
    assert m, f"unsupported series {text!r}"
    labels = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', m[2] or ""))
    return m[1], labels


def _load_series(test: dict) -> list[Series]:
    step = _duration_s(test["interval"])
    out = []
    for item in test["input_series"]:
        name, labels = _selector(item["series"])
        values = _expand(item["values"])
        out.append(Series(name, labels, [(i * step, v) for i, v in enumerate(values) if v is not None]))
    return out


def _increase(samples: list[tuple[float, float]], t: float, window: float) -> float | None:
    """Prometheus 2.x ``increase``: samples in [t - window, t], counter resets added back,
    extrapolated to the window's edges (as promql/functions.go extrapolatedRate)."""
    points = [(ts, v) for ts, v in samples if t - window <= ts <= t]
    if len(points) < 2:
        return None
    result = points[-1][1] - points[0][1]
    last = 0.0
    for _, v in points:
        if v < last:
            result += last
        last = v
    to_start, to_end = points[0][0] - (t - window), t - points[-1][0]
    sampled = points[-1][0] - points[0][0]
    average = sampled / (len(points) - 1)
    if result > 0 and points[0][1] >= 0:
        to_start = min(to_start, sampled * (points[0][1] / result))
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    return result * (interval / sampled)


def _instant(samples: list[tuple[float, float]], t: float, lookback: float = 300.0) -> float | None:
    before = [v for ts, v in samples if t - lookback < ts <= t]
    return before[-1] if before else None


def evaluate(series: list[Series], t: float) -> dict[str, dict[str, float]]:
    """The recording rules at time t: {record name: {job: value}}, plus the alert condition."""
    jobs = sorted({s.labels["job"] for s in series})
    out: dict[str, dict[str, float]] = {name: {} for name in EXPECTED_EXPRS}
    for job in jobs:
        mine = [s for s in series if s.labels["job"] == job]
        alphas = [v for s in mine if s.name == "gga_alpha" if (v := _instant(s.samples, t)) is not None]
        sizes = [v for s in mine if s.name == "gga_calibration_size" if (v := _instant(s.samples, t)) is not None]
        rows = [v for s in mine if s.name == "gga_rows_total" if (v := _increase(s.samples, t, WINDOW_S)) is not None]
        flags = [v for s in mine if s.name == "gga_flagged_total"
                 if (v := _increase(s.samples, t, WINDOW_S)) is not None]
        if alphas:
            out["gga:alpha"][job] = max(alphas)
        if sizes:
            out["gga:calibration_size"][job] = max(sizes)
        if rows:
            out["gga:rows:increase15m"][job] = math.fsum(rows)
        if flags:
            out["gga:flagged:increase15m"][job] = math.fsum(flags)
        if rows and flags:
            n, k = out["gga:rows:increase15m"][job], out["gga:flagged:increase15m"][job]
            out["gga:flag_rate:ratio15m"][job] = k / n if n else (math.nan if k == 0 else math.inf)
            if alphas and sizes:  # no gga_calibration_size: no bound, no alert
                a, m = out["gga:alpha"][job], out["gga:calibration_size"][job]
                out["gga:flag_rate:bound15m"][job] = bound(a, n, m)
                if alarm(a, n, k, m):
                    out[ALERT][job] = out["gga:flag_rate:ratio15m"][job]
    return out


def firing(series: list[Series], t_end: float, step: float) -> dict[str, float]:
    """Alerts firing at t_end ({job: value}), evaluating every ``step`` from 0 (the ``for`` state)."""
    active_since: dict[str, float] = {}
    fired: dict[str, float] = {}
    for i in range(int(round(t_end / step)) + 1):
        t = i * step
        now = evaluate(series, t)[ALERT]
        active_since = {job: active_since.get(job, t) for job in now}
        fired = {job: value for job, value in now.items() if t - active_since[job] >= FOR_S}
    return fired


def _humanize_percentage(value: float) -> str:
    return f"{value * 100:.4g}%"


def _render(template: str, labels: dict[str, str], value: float) -> str:
    """The two template forms the rules use: {{ $labels.x }} and {{ $value | humanizePercentage }}."""
    text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m[1]], template)
    text = re.sub(r"\{\{\s*\$value\s*\|\s*humanizePercentage\s*\}\}", _humanize_percentage(value), text)
    assert "{{" not in text, f"template form not covered by this test: {template!r}"
    return text


# --- helpers --------------------------------------------------------------------------------


def _groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def _rules() -> dict[str, dict]:
    return {rule.get("record") or rule["alert"]: rule for group in _groups() for rule in group["rules"]}


def _promtool_test() -> dict:
    return yaml.safe_load(PROMTOOL_TEST.read_text())


# --- the rules files --------------------------------------------------------------------------


def test_the_rules_are_the_pinned_expressions_in_dependency_order():
    groups = {g["name"]: g for g in _groups()}
    assert list(groups) == ["gga-drift", "gga-accept"]
    for group, pinned in ((groups["gga-drift"], EXPECTED_EXPRS), (groups["gga-accept"], ACCEPT_EXPRS)):
        names = [rule.get("record") or rule["alert"] for rule in group["rules"]]
        assert names == list(pinned)  # each group evaluated in order: each rule reads the ones above
    rules = _rules()
    for name, expr in {**EXPECTED_EXPRS, **ACCEPT_EXPRS}.items():
        assert " ".join(rules[name]["expr"].split()) == expr, name
    for name in (ACCEPT_ALERT, ALERT):
        assert _duration_s(rules[name]["for"]) == FOR_S
        assert rules[name]["labels"] == {"severity": "warning"}
    alert = rules[ALERT]
    assert _duration_s(alert["for"]) == FOR_S
    assert alert["labels"] == {"severity": "warning"}
    assert set(alert["annotations"]) == {"summary", "description"}


def test_the_rules_read_only_metrics_the_service_exposes():
    exposed = _exposed_sample_names()
    assert {"gga_alpha", "gga_calibration_size"} <= exposed
    for name, rule in _rules().items():
        unknown = set(re.findall(r"gga_[a-z_]+", rule["expr"])) - exposed
        assert not unknown, f"{name} reads {sorted(unknown)}, which the service does not expose"
        for recorded in re.findall(r"gga:[a-z0-9_:]+", rule["expr"]):
            assert recorded in _rules(), f"{name} reads {recorded}, which no rule records"


def test_compose_prometheus_loads_the_rules_file():
    prometheus = _compose()["services"]["prometheus"]
    mounts = _host_mounts(prometheus)
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    loaded = []
    for pattern in config["rule_files"]:
        folder, _, glob = pattern.rpartition("/")
        assert folder in mounts, f"rule_files {pattern!r} is in no folder compose mounts"
        loaded.extend(p for p in mounts[folder].iterdir() if fnmatch.fnmatch(p.name, glob))
    assert RULES in loaded
    # the promtool unit test is not under the loaded folder (it is not a rules file)
    assert PROMTOOL_TEST not in loaded


def test_kubernetes_prometheus_rule_holds_the_same_groups():
    (doc,) = [d for d in yaml.safe_load_all(K8S_RULES.read_text()) if d]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "gga"
    assert doc["spec"] == {"groups": _groups()}


# --- the bound, exact numbers ----------------------------------------------------------------


def test_z_is_the_one_sided_normal_quantile_of_the_stated_false_alarm_rate():
    assert _normal_upper_tail(Z) == pytest.approx(0.001, rel=1e-3)  # 0.0010008
    assert _normal_upper_tail(Z) > 0.001 > _normal_upper_tail(Z + 0.01)


def test_bound_on_recorded_counter_values():
    # two scrapes 15 minutes apart: rows 1000 -> 2500, flagged 50 -> k; the bundled detector's m = 6000
    n = 2500 - 1000
    assert bound(0.05, n, 6000) == 0.05 + 3.09 * math.sqrt(0.05 * 0.95 * (1 / 1500 + 1 / 6000)) == 0.06944082367082219
    assert bound(0.05, n, 6000) * n == pytest.approx(104.1612, abs=1e-4)
    assert not alarm(0.05, n, 125 - 50, 6000)  # 5.0%: alpha itself
    assert not alarm(0.05, n, 152 - 50, 6000)  # 102 flags, 6.80%: above the old bound (101.08 flags), inside this one
    assert not alarm(0.05, n, 154 - 50, 6000)  # 104 flags, 6.93%: inside
    assert alarm(0.05, n, 155 - 50, 6000)  # 105 flags, 7.00%: above
    assert old_bound(0.05, n) * n == pytest.approx(101.0826, abs=1e-4)
    # a smaller calibration set, a wider bound: m = 1000 allows 116 flags of 1500
    assert bound(0.05, n, 1000) == 0.07749347649898063
    assert not alarm(0.05, n, 116, 1000) and alarm(0.05, n, 117, 1000)
    # alpha 0.01: the bound is relative to the served alpha
    assert bound(0.01, 1500, 6000) == pytest.approx(0.018875, abs=1e-6)
    assert not alarm(0.01, 1500, 28, 6000) and alarm(0.01, 1500, 29, 6000)


def test_the_bound_stays_above_the_calibration_floor():
    # with n -> infinity only the calibration term is left: alpha + 3.09 sqrt(alpha (1 - alpha) / m)
    assert bound(0.05, 1e12, 6000) == pytest.approx(0.058694, abs=1e-6)  # README: 5.87%
    assert bound(0.05, 1e12, 1000) == pytest.approx(0.071296, abs=1e-6)  # 7.13%
    # it falls with n towards that floor, which lies above the old bound at such traffic (7.25% > 7.13% > 5.71%)
    assert bound(0.05, 9000, 1000) > bound(0.05, 1e12, 1000) > old_bound(0.05, 9000)
    # no detector: m is NaN, so is the bound, and no comparison holds
    assert math.isnan(bound(0.05, 1500, math.nan)) and not alarm(0.05, 1500, 1500, math.nan)


def test_too_few_rows_never_alarm():
    # n alpha >= 10: 200 rows at alpha 0.05, 1000 at alpha 0.01
    assert not alarm(0.05, 199, 199, 6000) and alarm(0.05, 200, 40, 6000)
    assert not alarm(0.01, 999, 999, 6000) and alarm(0.01, 1000, 40, 6000)
    assert not alarm(0.05, 0, 0, 6000)
    assert bound(0.05, 200, 6000) == pytest.approx(0.098407, abs=1e-6)  # at the smallest n: flag rate > 9.84%
    assert _first_alarm(200, bound(0.05, 200, 6000)) == 20


def test_flag_probability_of_a_calibration_draw_is_the_stated_beta():
    """q, the flag probability a calibration set of m scores gives in-distribution rows, simulated
    with the detector's own conformal_threshold on uniform scores, against Beta(c, m + 1 - c)."""
    from detectors.calibration import conformal_threshold

    alpha, m, draws = 0.05, 1000, 4000
    a, b = _flag_probability_law(alpha, m)
    assert (a, b) == (50, 951)
    mean, sd = a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    assert mean == 50 / 1001 and sd == pytest.approx(0.0068819, abs=1e-7)
    assert sd == pytest.approx(math.sqrt(alpha * (1 - alpha) / (m + 2)), rel=1e-3)  # 0.0068851
    scores = torch.sort(torch.rand((draws, m), generator=torch.Generator().manual_seed(0), dtype=torch.float64)).values
    q = torch.tensor([1 - conformal_threshold(row, alpha) for row in scores], dtype=torch.float64)
    assert abs(float(q.mean()) - mean) < 3 * sd / math.sqrt(draws)
    assert float(q.std()) == pytest.approx(sd, rel=0.05)
    # the Beta is skewed right: more draws land 2 sd high than 2 sd low
    assert int((q > mean + 2 * sd).sum()) > int((q < mean - 2 * sd).sum())


def test_calibration_randomness_breaks_the_old_bound_and_the_new_one_accounts_for_it():
    """m = 1000 calibration scores, n = 9000 rows per window (10 rows/s), alpha = 0.05: the calibration's
    sd of the flag rate (0.0069) is three times the traffic's (0.0023)."""
    alpha, n, m = 0.05, 9000, 1000
    assert math.sqrt(alpha * (1 - alpha) / (m + 2)) == pytest.approx(0.006885, abs=1e-6)
    assert math.sqrt(alpha * (1 - alpha) / n) == pytest.approx(0.002297, abs=1e-6)
    old, new = old_bound(alpha, n), bound(alpha, n, m)
    assert (old, _first_alarm(n, old)) == (0.057098785107326466, 514)
    assert (new, _first_alarm(n, new)) == (0.07244832955923447, 653)

    # a detector whose calibration landed one sd high: q = 5.69% on clean traffic
    q = alpha + math.sqrt(alpha * (1 - alpha) / (m + 2))
    assert q == pytest.approx(0.056885, abs=1e-6)
    given_old, given_new = _false_alarm_given_q(n, q, old), _false_alarm_given_q(n, q, new)
    assert given_old == pytest.approx(0.46952, abs=1e-5)  # the old bound: clean traffic alarms at ~half the evaluations
    assert given_new == pytest.approx(3.758e-10, rel=1e-3)
    # a detector exactly at alpha: the price is sensitivity, the bound sits far above its traffic's noise
    assert _false_alarm_given_q(n, alpha, old) == pytest.approx(0.0012908, abs=1e-7)
    assert _false_alarm_given_q(n, alpha, new) == pytest.approx(1.610e-20, rel=1e-3)

    # over calibration draws and traffic (the rate the bound states): exact beta-binomial, and a grid over q
    marginal_old = _false_alarm_marginal(n, alpha, m, old)
    marginal_new = _false_alarm_marginal(n, alpha, m, new)
    assert marginal_old == pytest.approx(0.16276, abs=1e-5)  # 163 times the stated 0.001
    assert marginal_new == pytest.approx(0.0024716, abs=1e-7)  # 2.5 times it: the skewed Beta and binomial tails
    assert 0.001 < marginal_new < 0.0025 and marginal_old > 60 * marginal_new
    assert _false_alarm_marginal_grid(n, alpha, m, old) == pytest.approx(marginal_old, rel=1e-8)
    assert _false_alarm_marginal_grid(n, alpha, m, new) == pytest.approx(marginal_new, rel=1e-8)


def test_false_alarm_rate_exact():
    """The normal approximation's 0.001 against the exact rates over calibration draws and traffic
    (beta-binomial; README numbers), and given q = alpha (binomial)."""
    def marginal(n, alpha, m):
        return _false_alarm_marginal(n, alpha, m, bound(alpha, n, m))

    # the bundled detector's m = 6000 at alpha = 0.05
    assert marginal(200, 0.05, 6000) == pytest.approx(0.0031, abs=5e-5)  # fires at k >= 20 of 200
    assert marginal(1000, 0.05, 6000) == pytest.approx(0.0015, abs=5e-5)
    assert marginal(9000, 0.05, 6000) == pytest.approx(0.0015, abs=5e-5)
    assert marginal(20000, 0.05, 6000) == pytest.approx(0.0015, abs=5e-5)
    assert marginal(60000, 0.05, 6000) == pytest.approx(0.0015, abs=5e-5)
    assert marginal(1000, 0.01, 6000) == pytest.approx(0.0034, abs=5e-5)
    # alpha m = 50 and 10: the Beta's skew grows as alpha m shrinks
    assert marginal(9000, 0.05, 1000) == pytest.approx(0.0025, abs=5e-5)
    assert marginal(9000, 0.01, 1000) == pytest.approx(0.0054, abs=5e-5)
    # the old bound over calibration draws at m = 6000: fine at small n, not at large n
    assert _false_alarm_marginal(1000, 0.05, 6000, old_bound(0.05, 1000)) == pytest.approx(0.0032, abs=5e-5)
    assert _false_alarm_marginal(9000, 0.05, 6000, old_bound(0.05, 9000)) == pytest.approx(0.0288, abs=5e-5)
    assert _false_alarm_marginal(60000, 0.05, 6000, old_bound(0.05, 60000)) == pytest.approx(0.175, abs=5e-4)
    # given q = alpha: below the marginal rate (q varies around alpha; this detector's did not)
    assert _false_alarm_given_q(200, 0.05, bound(0.05, 200, 6000)) == pytest.approx(0.0027, abs=5e-5)
    assert _false_alarm_given_q(1000, 0.05, bound(0.05, 1000, 6000)) == pytest.approx(0.00065, abs=5e-6)
    # a true flag rate below alpha alarms even less
    assert _false_alarm_given_q(1000, 0.045, bound(0.05, 1000, 6000)) < \
        _false_alarm_given_q(1000, 0.05, bound(0.05, 1000, 6000)) / 3


# --- the scenarios of the promtool test, in Python --------------------------------------------


def test_python_evaluator_agrees_with_the_promtool_expectations():
    spec = _promtool_test()
    step = _duration_s(spec["evaluation_interval"])
    assert spec["rule_files"] == ["../rules/gga-drift.yml"]
    (test,) = spec["tests"]
    series = _load_series(test)
    checked = 0
    for case in test["promql_expr_test"]:
        name, selector = _selector(case["expr"])
        values = evaluate(series, _duration_s(case["eval_time"]))[name]
        got = {job: v for job, v in values.items() if selector.get("job", job) == job}
        expected = {}
        for sample in case["exp_samples"]:
            sample_name, labels = _selector(sample["labels"])
            assert sample_name == name and set(labels) == {"job"}
            expected[labels["job"]] = float(sample["value"])
        assert got == expected, case  # exact: the same float operations as Prometheus
        checked += len(expected)
    alerts = 0
    for case in test["alert_rule_test"]:
        assert case["alertname"] == ALERT
        fired = firing(series, _duration_s(case["eval_time"]), step)
        labels_and_annotations = []
        for job, value in fired.items():
            labels = {"job": job, **_rules()[ALERT]["labels"]}
            annotations = {k: _render(v, labels, value) for k, v in _rules()[ALERT]["annotations"].items()}
            labels_and_annotations.append((labels, annotations))
        expected = [(a["exp_labels"], a["exp_annotations"]) for a in case["exp_alerts"]]
        assert labels_and_annotations == expected, case["eval_time"]
        alerts += len(expected)
    assert checked >= 20 and alerts == 2


def test_drift_scenario_timeline():
    """The drift job's 15-minute flag rate is 0.05 + t/150, t minutes into the drift (minute 30):
    over its bound 7.75% (m = 1000) from t = 5, firing from t = 10 (for: 5m); steady, within,
    restart, quiet never. The within job's 7% is above the bound without the calibration term."""
    (test,) = _promtool_test()["tests"]
    series = _load_series(test)
    onset = None
    for minute in range(0, 61):
        rules = evaluate(series, minute * 60.0)
        if minute >= 15:
            assert rules["gga:flag_rate:ratio15m"]["steady"] == 0.05
            assert rules["gga:flag_rate:ratio15m"]["within"] == 0.07
            assert old_bound(0.05, 1500) < 0.07 < rules["gga:flag_rate:bound15m"]["within"] == bound(0.05, 1500, 1000)
            assert rules["gga:rows:increase15m"]["restart"] == 1500  # across the counter reset too
        if 30 <= minute <= 45:
            assert rules["gga:flag_rate:ratio15m"]["drift"] == pytest.approx(0.05 + (minute - 30) / 150, abs=1e-15)
        if onset is None and "drift" in rules[ALERT]:
            onset = minute
        assert set(rules[ALERT]) <= {"drift"}
    assert onset == 35
    assert firing(series, 39 * 60.0, 60.0) == {}
    assert set(firing(series, 40 * 60.0, 60.0)) == {"drift"}
    # with the bundled detector's m = 6000 (bound 6.94%) the same drift passes at t = 3 and fires at t = 8
    for m_series in (s for s in series if s.name == "gga_calibration_size" and s.labels["job"] == "drift"):
        m_series.samples = [(ts, 6000.0) for ts, _ in m_series.samples]
    assert "drift" not in evaluate(series, 32 * 60.0)[ALERT] and "drift" in evaluate(series, 33 * 60.0)[ALERT]
    assert firing(series, 37 * 60.0, 60.0) == {} and set(firing(series, 38 * 60.0, 60.0)) == {"drift"}


# --- promtool -----------------------------------------------------------------------------------


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@needs_promtool
def test_promtool_checks_the_rules_and_the_kubernetes_copy(tmp_path):
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    spec = next(d for d in yaml.safe_load_all(K8S_RULES.read_text()) if d)["spec"]
    (tmp_path / "k8s.yml").write_text(yaml.safe_dump(spec))
    done = _promtool("check", "rules", str(tmp_path / "k8s.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_checks_the_prometheus_config_with_its_rules(tmp_path):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    mounts = _host_mounts(_compose()["services"]["prometheus"])
    config["rule_files"] = [str(mounts[p.rpartition("/")[0]] / p.rpartition("/")[2]) for p in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    # the gga-drift group's 7 rules and the gga-accept group's 7 (recording rules and alerts)
    assert "14 rules found" in done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_test_of_the_rules():
    done = _promtool("test", "rules", PROMTOOL_TEST.name, cwd=PROMTOOL_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@needs_promtool
@pytest.mark.parametrize(("old", "new"), [
    ("3.09 *", "2 *"),  # a lower z: the drift alarms before minute 40
    (" + 1 / gga:calibration_size", ""),  # no calibration term: the within job (7%) alarms, the drift at minute 38
    ("(gga_calibration_size)", "(gga_calibration_size) * 6"),  # m 6 times larger: within alarms, drift at 38
    ("for: 5m", "for: 4m"),
    (">= 10", ">= 7"),  # the quiet job (7.5 expected flags) alarms
    ("[15m]", "[10m]"),
])
def test_promtool_unit_test_catches_a_changed_rule(tmp_path, old, new):
    text = RULES.read_text()
    assert old in text
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(text.replace(old, new))
    (tmp_path / "tests" / PROMTOOL_TEST.name).write_text(PROMTOOL_TEST.read_text())
    done = _promtool("test", "rules", PROMTOOL_TEST.name, cwd=tmp_path / "tests")
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


# --- the service's counters -----------------------------------------------------------------------


MNIST = ROOT.parent / "shared" / "data"


@pytest.mark.slow
def test_alarm_on_the_service_counters_clean_then_out_of_distribution(tmp_path):
    """gga_alpha is the served alpha and gga_calibration_size the served detector's m; the counters
    of clean MNIST digits stay inside the bound, those of Fashion-MNIST images (out of distribution)
    go above it."""
    from detectors.datasets import load_idx_split
    from service.worker import DetectorSlot
    from tests.support.service import Running, make_settings, npy_bytes, run

    if not (MNIST / "mnist").is_dir() or not (MNIST / "fashion_mnist").is_dir():
        pytest.skip(f"MNIST / Fashion-MNIST not found under {MNIST}")
    clean = load_idx_split(MNIST / "mnist", "t10k")[0][:400]
    fashion = load_idx_split(MNIST / "fashion_mnist", "t10k")[0][:200]

    def counters(m):
        return (m[("gga_alpha", ())], m[("gga_calibration_size", ())], m[("gga_rows_total", ())],
                m[("gga_flagged_total", ())])

    async def go(settings, batches):
        async with Running(settings) as svc:
            seen = [counters(await svc.metrics())]
            for x in batches:
                r = await svc.client.post("/predict", content=npy_bytes(x),
                                          headers={"content-type": "application/x-npy"})
                assert r.status_code == 200, r.text
                seen.append(counters(await svc.metrics()))
            return seen

    seen = run(go(make_settings(tmp_path), [clean, fashion]))
    (alpha, m, n0, k0), (_, _, n1, k1), (_, _, n2, k2) = seen
    assert alpha == 0.05  # the bundled detector's alpha
    assert (n0, k0) == (0, 0) and n1 - n0 == 400 and n2 - n1 == 200
    assert m == 4000  # gga_calibration_size: the bundled detector's 4,000 held-out validation images
    assert not alarm(alpha, n1 - n0, k1 - k0, m), f"clean digits: {k1 - k0} of 400 flagged"
    assert (k1 - k0) / 400 <= bound(alpha, 400, m)
    assert alarm(alpha, n2 - n1, k2 - k1, m), f"Fashion-MNIST: {k2 - k1} of 200 flagged"

    (alpha, *_), = run(go(make_settings(tmp_path, serve_alpha=0.1), []))
    assert alpha == 0.1  # GGA_SERVE_ALPHA overrides the detector's

    async def swapped():
        async with Running(make_settings(tmp_path)) as svc:
            detector, _ = svc.app.state.slot.get()
            seen = []
            # as a fit with alpha 0.2 on 500 calibration scores (the contract's metadata()), then no detector
            for new in (SimpleNamespace(alpha=0.2, metadata=lambda: {"fit": {"n_calibration": 500}}), None):
                DetectorSlot.swap(svc.app.state.slot, new, "v9")
                try:
                    seen.append(counters(await svc.metrics())[:2])
                finally:
                    DetectorSlot.swap(svc.app.state.slot, detector, "v0")
            return seen

    (alpha, m), (alpha2, m2) = run(swapped())
    assert (alpha, m) == (0.2, 500)  # read at each scrape: follows the served detector
    assert math.isnan(alpha2) and math.isnan(m2)  # no detector served: NaN, so no bound and no alert


# --- the accept-rate group -------------------------------------------------------------------


def test_accept_bound_on_recorded_counter_values():
    # p = 0.95 accepted on m = 6000 calibration samples, n = 2000 gated rows in 15 minutes
    b = accept_bound(0.95, 2000, 6000)
    assert b == pytest.approx(0.95 - 3.09 * math.sqrt(0.95 * 0.05 * (1 / 2000 + 1 / 6000)), abs=1e-15)
    assert b == pytest.approx(0.932612, abs=1e-6)
    assert not accept_alarm(0.95, 2000, 1866, 6000)  # 0.933: inside the bound (1865.2 rows)
    assert accept_alarm(0.95, 2000, 1865, 6000)  # 0.9325: below it
    assert not accept_alarm(0.95, 150, 100, 6000)  # 7.5 expected rejections: too few rows to judge


def test_accept_false_alarm_rate_is_small_on_in_distribution_traffic():
    # the accept count of in-distribution rows, p drawn as the gate's calibration share (binomial over m)
    rng = np.random.default_rng(0)
    p_true, m, n = 0.95, 6000, 2000
    p_cal = rng.binomial(m, p_true, 20000) / m
    accepted = rng.binomial(n, p_true, 20000)
    alarms = np.mean([accept_alarm(p, n, a, m) for p, a in zip(p_cal, accepted, strict=True)])
    assert alarms < 0.003  # one-sided z = 3.09: about 0.001 per evaluation


def test_the_accept_rules_read_metrics_the_service_exposes():
    exposed = _exposed_sample_names()
    assert {"gga_accepted_total", "gga_gated_rows_total", "gga_accept_rate_calibration",
            "gga_gate_calibration_size", "gga_prediction_set_size_bucket"} <= exposed
