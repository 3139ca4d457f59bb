"""A selective gate with a guaranteed error rate among the predictions it accepts.

Given a correctness score s (higher = more likely correct) on n labelled calibration inputs and
whether each prediction was correct, :class:`SelectiveGate` picks a threshold t̂ and accepts an
input when s ≥ t̂. Guarantee (Geifman & El-Yaniv 2017; Learn-then-Test, Angelopoulos, Bates,
Candès, Jordan & Lei 2021): with probability ≥ 1 − δ over the calibration sample, the selective
risk R(t̂) = P(wrong | s ≥ t̂) ≤ r, for inputs exchangeable with the calibration inputs.

Procedure. For a threshold t let N(t) = #{s_i ≥ t} and K(t) = the errors among them. Given N(t),
K(t) ~ Binomial(N(t), R(t)), so p(t) = P(Binomial(N(t), r) ≤ K(t)) is a valid p-value of
H_t: R(t) > r, and p(t) ≤ δ ⟺ the Clopper–Pearson upper bound of R(t) at level 1 − δ is ≤ r.
Fixed-sequence testing walks t down the distinct calibration scores from the most confident end
and stops at the first t with p(t) > δ; t̂ is the last t that passed. The walk starts at a fixed
count of accepted samples, n_e = the fewest accepted samples at which e errors can still pass
(``start_errors`` = e; e = 0 gives n₀ = ⌈log δ / log(1 − r)⌉ = 299 for r = 0.01, δ = 0.05, and
e = 1, the default, gives 473): above n₀ every test fails by construction, and a start at n₀
would let one confident error among the first n₀ end the walk before it has any power; the
start is fixed before the data are seen (a count, not a score).

Why the level holds. Let t* be the largest threshold with R(t*) > r (a property of the
distribution, not of the sample). Accepting a threshold t̂ ≤ t* means the walk passed the test at
the calibration score whose accepted set equals that of t*, a single test of the fixed hypothesis
H_{t*}: probability ≤ δ. This needs at least n_e calibration scores at or above t*; when fewer lie
there, the first test is of an order statistic below t*, whose n_e − 1 higher samples are i.i.d.
from the distribution above it (error rate > r when R falls with t), so the level holds up to the
one sample at the start. Measured on a synthetic model with closed-form R (tests/detectors/
test_conformal.py): 7 violations in 250 calibration draws at δ = 0.05.

Correctness scores (float64 [B], higher = more likely correct): :func:`max_softmax`,
:func:`logit_margin` and :func:`gated_by_trust` (any score, with inputs the detector flags
forced to −∞, i.e. always rejected).

The Clopper–Pearson bound is the root of a binomial CDF, computed here in log space with
``math.lgamma`` (no scipy): U(k, n, δ) = the p with P(Binomial(n, p) ≤ k) = δ (U = 1 when k = n),
found by bisection; U = 1 − δ^{1/n} when k = 0 and (1 − δ)^{1/n} when k = n − 1 (closed forms).
"""

from __future__ import annotations

import math
from typing import Self

import torch

__all__ = ["InsufficientCalibrationError", "SelectiveGate", "binomial_cdf", "binomial_log_cdf",
           "binomial_log_cdf_many", "clopper_pearson_upper", "gated_by_trust", "logit_margin", "max_softmax",
           "samples_for_errors", "samples_needed"]


class InsufficientCalibrationError(ValueError):
    """No threshold meets the risk target with the calibration data given; ``needed`` says how many
    calibration samples would make it possible (see :func:`samples_needed`)."""

    def __init__(self, message: str, needed: int | None) -> None:
        super().__init__(message)
        self.needed = needed


# ------------------------------------------------------------------ binomial tail and Clopper-Pearson


def binomial_log_cdf(k: int, n: int, p: float) -> float:
    """log P(Binomial(n, p) ≤ k) = log Σ_{i=0..k} C(n, i) p^i (1 − p)^{n−i}, summed in log space."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and p in [0, 1], got n={n}, p={p}")
    if k < 0:
        return -math.inf
    if k >= n or p == 0.0:
        return 0.0
    if p == 1.0:
        return -math.inf
    lp, lq, lgn = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms = [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(0.0, top + math.log(sum(math.exp(t - top) for t in terms)))


def binomial_log_cdf_many(k: torch.Tensor, n: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`binomial_log_cdf` for many (k, n) pairs at one p in (0, 1): float64 [M], via one [M, max k + 1]
    table of log-pmf terms (entries i > k masked out) and a log-sum-exp."""
    k = torch.as_tensor(k, dtype=torch.long).flatten()
    n = torch.as_tensor(n, dtype=torch.long).flatten()
    if len(k) == 0:
        return torch.empty(0, dtype=torch.float64)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    i = torch.arange(int(k.max()) + 1, dtype=torch.float64)[None, :]
    nf = n.double()[:, None]
    valid = (i <= k.double()[:, None]) & (i <= nf)
    terms = (torch.lgamma(nf + 1) - torch.lgamma(i + 1) - torch.lgamma(torch.clamp(nf - i, min=0) + 1)
             + i * math.log(p) + (nf - i) * math.log1p(-p))
    out = torch.logsumexp(torch.where(valid, terms, -math.inf), dim=1).clamp(max=0.0)
    return torch.where(k >= n, torch.zeros_like(out), torch.where(k < 0, torch.full_like(out, -math.inf), out))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) ≤ k)."""
    return math.exp(binomial_log_cdf(k, n, p))


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided upper confidence bound at level 1 − δ of a binomial proportion with k successes in n.

    The p solving P(Binomial(n, p) ≤ k) = δ (the CDF falls in p), by bisection to 1e-15;
    1 when k ≥ n or n = 0. Equal to the (1 − δ) quantile of Beta(k + 1, n − k)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if k < 0 or n < 0:
        raise ValueError(f"need k >= 0 and n >= 0, got k={k}, n={n}")
    if k >= n:
        return 1.0
    if k == 0:
        return -math.expm1(math.log(delta) / n)
    log_delta = math.log(delta)
    lo, hi = k / n, 1.0
    while hi - lo > 1e-15:
        mid = 0.5 * (lo + hi)
        if binomial_log_cdf(k, n, mid) > log_delta:
            lo = mid
        else:
            hi = mid
    return hi


def _passes(k: int, n: int, risk: float, log_delta: float) -> bool:
    """p-value test P(Binomial(n, r) ≤ k) ≤ δ, i.e. Clopper–Pearson upper bound ≤ r."""
    return n > 0 and binomial_log_cdf(k, n, risk) <= log_delta


def samples_for_errors(risk: float, delta: float, errors: int) -> int:
    """The fewest accepted samples m at which ``errors`` errors pass: P(Binomial(m, r) ≤ errors) ≤ δ
    (the test falls with m for fixed errors, so the first m found by doubling and bisection is the answer)."""
    if errors < 0:
        raise ValueError(f"errors must be >= 0, got {errors}")
    log_delta = math.log(delta)
    hi = max(errors + 1, 1)
    while not _passes(errors, hi, risk, log_delta):
        hi *= 2
    lo = errors  # fails: m <= errors means every sample may be wrong
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _passes(errors, mid, risk, log_delta):
            hi = mid
        else:
            lo = mid
    return hi


def samples_needed(risk: float, delta: float, error_rate: float = 0.0, limit: int = 10**8) -> int | None:
    """The fewest accepted samples n at which k = ⌊error_rate · n⌋ errors give a Clopper–Pearson bound ≤ risk.

    error_rate = 0: n₀ = ⌈log δ / log(1 − r)⌉ (the smallest n with (1 − r)^n ≤ δ). None when
    error_rate ≥ risk (no n suffices) or the answer exceeds ``limit``. Found by doubling, then
    bisection (the test is monotone in n up to the floor's steps; the result is checked exactly)."""
    if not 0.0 < risk < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"risk and delta must lie in (0, 1), got risk={risk}, delta={delta}")
    if error_rate >= risk:
        return None
    log_delta = math.log(delta)
    if error_rate <= 0.0:
        n = math.ceil(log_delta / math.log1p(-risk))
        while n > 1 and _passes(0, n - 1, risk, log_delta):  # guard against rounding of the closed form
            n -= 1
        while not _passes(0, n, risk, log_delta):
            n += 1
        return n

    def ok(m: int) -> bool:
        return _passes(math.floor(error_rate * m), m, risk, log_delta)

    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------ correctness scores


def max_softmax(logits) -> torch.Tensor:
    """max_c softmax(z)_c in float64 [B] (Hendrycks & Gimpel 2017); higher = more likely correct."""
    return torch.softmax(torch.as_tensor(logits).to("cpu", torch.float64), dim=1).amax(dim=1)


def logit_margin(logits) -> torch.Tensor:
    """z_(1) − z_(2), the gap between the two largest logits, in float64 [B]; higher = more likely correct."""
    z = torch.as_tensor(logits).to("cpu", torch.float64)
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [B, C >= 2], got {tuple(z.shape)}")
    top = torch.topk(z, 2, dim=1).values
    return top[:, 0] - top[:, 1]


def gated_by_trust(score, trust, alpha: float) -> torch.Tensor:
    """``score`` [B] with −∞ wherever trust < α (the detector flags the input): such inputs are
    never accepted, whatever the threshold; float64 [B]."""
    s = torch.as_tensor(score).to("cpu", torch.float64).flatten()
    t = torch.as_tensor(trust).to("cpu", torch.float64).flatten()
    if len(s) != len(t):
        raise ValueError(f"score and trust must have the same length, got {len(s)} and {len(t)}")
    return torch.where(t < alpha, torch.full_like(s, -math.inf), s)


# ------------------------------------------------------------------ the gate


class SelectiveGate:
    """Accept s ≥ t̂, with t̂ chosen by fixed-sequence testing (module docstring); fitted state only.

    After fit: ``threshold`` t̂, ``n_calibration``, ``n_accepted`` N(t̂), ``errors`` K(t̂) and
    ``risk_bound`` (the Clopper–Pearson upper bound of R(t̂) at level 1 − δ, ≤ risk_target)."""

    def __init__(self, risk_target: float = 0.01, delta: float = 0.05, start_errors: int = 1) -> None:
        if not 0.0 < risk_target < 1.0:
            raise ValueError(f"risk_target must lie in (0, 1), got {risk_target}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if int(start_errors) < 0:
            raise ValueError(f"start_errors must be >= 0, got {start_errors}")
        self.risk_target = float(risk_target)
        self.delta = float(delta)
        self.start_errors = int(start_errors)
        self.start = samples_for_errors(self.risk_target, self.delta, self.start_errors)
        self.threshold: float | None = None
        self.n_calibration = 0
        self.n_accepted = 0
        self.errors = 0
        self.risk_bound = 1.0

    @property
    def fitted(self) -> bool:
        return self.threshold is not None

    def fit(self, scores, correct) -> Self:
        """Choose t̂ from correctness scores [n] and correctness flags [n] (bool: the prediction was right).

        Raises :class:`InsufficientCalibrationError` when no threshold passes."""
        s = torch.as_tensor(scores).to("cpu", torch.float64).flatten()
        c = torch.as_tensor(correct).to("cpu").flatten()
        if c.dtype != torch.bool:
            raise ValueError(f"correct must be a bool tensor (the prediction was right), got {c.dtype}")
        if len(s) != len(c) or len(s) == 0:
            raise ValueError(f"scores and correct must be non-empty and of equal length, got {len(s)} and {len(c)}")
        if torch.isnan(s).any():
            raise ValueError("scores contain NaN")
        n = len(s)
        order = torch.argsort(s, descending=True, stable=True)
        s_sorted = s[order]
        errors = torch.cumsum((~c[order]).long(), dim=0)
        # group ends: positions where the next score differs (the accepted set of t = s_sorted[i])
        ends = torch.nonzero(torch.cat([s_sorted[1:] != s_sorted[:-1], torch.tensor([True])])).flatten().tolist()
        n0 = self.start
        ends_t = torch.tensor(ends, dtype=torch.long)
        ends_t = ends_t[(ends_t + 1 >= n0) & (s_sorted[ends_t] > -math.inf)]  # −∞ means "never accept"
        m_all, k_all = ends_t + 1, errors[ends_t]
        n_pass = 0  # tests in order, in chunks, up to the first failure
        for start in range(0, len(m_all), 512):
            chunk = slice(start, start + 512)
            passed = binomial_log_cdf_many(k_all[chunk], m_all[chunk], self.risk_target) <= math.log(self.delta)
            if not bool(passed.all()):
                n_pass += int(torch.nonzero(~passed)[0, 0])
                break
            n_pass += len(passed)
        best = None if n_pass == 0 else (float(s_sorted[ends_t[n_pass - 1]]), int(m_all[n_pass - 1]),
                                         int(k_all[n_pass - 1]))
        self.n_calibration = n
        if best is None:
            total_err = int(errors[-1])
            first = next((i for i in ends if i + 1 >= n0), None)
            seen = f"{int(errors[first])} errors among the {first + 1} most confident" if first is not None else \
                f"{total_err} errors among all {n}"
            at_rate = samples_needed(self.risk_target, self.delta, total_err / n)
            rate_note = (f"; at the overall error rate {total_err / n:.4f} of these samples, about {at_rate} "
                         "accepted samples" if at_rate is not None else
                         f"; the overall error rate {total_err / n:.4f} is itself above the target, so the "
                         "most confident part must be nearly error-free")
            raise InsufficientCalibrationError(
                f"no threshold meets risk_target={self.risk_target} at delta={self.delta} with {n} calibration "
                f"samples ({seen}): the test starts at {n0} accepted samples, where at most {self.start_errors} "
                f"errors give a Clopper-Pearson bound <= {self.risk_target} ({max(n0 - n, 0)} more samples than "
                f"given if all were accepted; with zero errors {samples_needed(self.risk_target, self.delta)} "
                f"would do, at start_errors=0){rate_note}; give more calibration data or a larger risk_target",
                needed=max(n0 - n, 0))
        self.threshold, self.n_accepted, self.errors = best
        self.risk_bound = clopper_pearson_upper(self.errors, self.n_accepted, self.delta)
        return self

    def accept(self, scores) -> torch.Tensor:
        """Bool [B]: score ≥ t̂."""
        if not self.fitted:
            raise RuntimeError("the gate is not fitted: call fit(scores, correct) or load_state_dict")
        return torch.as_tensor(scores).to("cpu", torch.float64).flatten() >= self.threshold

    def metadata(self) -> dict:
        if not self.fitted:
            raise RuntimeError("the gate is not fitted")
        return {"risk_target": self.risk_target, "delta": self.delta, "threshold": self.threshold,
                "n_calibration": self.n_calibration, "n_accepted": self.n_accepted, "errors": self.errors,
                "risk_bound": self.risk_bound, "start_errors": self.start_errors, "start": self.start}

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """[risk_target, delta, t̂, n_calibration, n_accepted, errors, start_errors] as float64 [7]."""
        if not self.fitted:
            raise RuntimeError("the gate is not fitted")
        return {f"{prefix}gate": torch.tensor([self.risk_target, self.delta, self.threshold, self.n_calibration,
                                               self.n_accepted, self.errors, self.start_errors],
                                              dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> Self:
        try:
            v = torch.as_tensor(state[f"{prefix}gate"]).to(torch.float64).flatten().tolist()
        except KeyError as exc:
            raise ValueError(f"gate state is missing {exc}") from exc
        if len(v) != 7 or any(math.isnan(x) for x in v):
            raise ValueError(f"gate state must hold 7 numbers, got {v}")
        self.__init__(v[0], v[1], int(v[6]))
        self.threshold, self.n_calibration, self.n_accepted, self.errors = v[2], int(v[3]), int(v[4]), int(v[5])
        self.risk_bound = clopper_pearson_upper(self.errors, self.n_accepted, self.delta)
        return self
