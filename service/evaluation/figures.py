"""The figures of a ``gga-eval`` report (matplotlib, the ``eval`` extra, imported only here and lazily).

``roc.png``: the ROC curve of every set against the in-distribution samples;
``trust_<set>.png``: the trust histograms of the clean set and each set, with alpha;
``csm_<set>.png``: the first sample's N x N CSM, rows and columns in the order of its
predicted classes (skipped with a note when the detector gives no CSM);
``sets_vs_alpha.png`` and ``risk_coverage.png``: the decisions' curves
(:mod:`service.evaluation.conformal_curves`), when the report has them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.evaluation.data import CLEAN, DataSet
from service.evaluation.errors import UsageError
from service.evaluation.scoring import SetScores

MATPLOTLIB_HINT = ("gga-eval draws its figures with matplotlib, which comes with the 'eval' extra: "
                   "pip install 'gga-trust[eval]' (in a checkout: pip install -e '.[eval]')")


def roc_points(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the rules ``score >= t`` over every distinct score, OOD positive, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([s_in, s_out]))[::-1]
    si, so = np.sort(s_in), np.sort(s_out)
    fpr = (len(si) - np.searchsorted(si, thresholds, side="left")) / len(si)
    tpr = (len(so) - np.searchsorted(so, thresholds, side="left")) / len(so)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def figure_class():
    """matplotlib's Figure; :class:`UsageError` naming the extra when matplotlib is missing."""
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
    Figure = figure_class()
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


def draw_decision_curves(out: Path, curves: dict | None, detector_label: str) -> list[str]:
    """``sets_vs_alpha.png`` (coverage and mean set size vs alpha, with the 1 - alpha line) and
    ``risk_coverage.png`` (the gate's score and max softmax, the served operating point marked) from
    :func:`service.evaluation.conformal_curves.decision_curves`; each only when its curves are there."""
    if curves is None:
        return []
    Figure = figure_class()
    files = []
    sets = curves.get("sets")
    if sets:
        a = np.asarray(sets["alpha"])
        fig = Figure(figsize=(9.6, 4.0))
        ax_cov, ax_size = fig.subplots(1, 2)
        ax_cov.plot(a, 1 - a, ls=":", color="grey", lw=1, label="1 - alpha (the guarantee)")
        ax_cov.plot(a, sets["coverage"], marker="o", ms=3, lw=1.5, label=f"{sets['score']} sets")
        ax_size.plot(a, sets["mean_size"], marker="o", ms=3, lw=1.5, color="tab:orange")
        for ax in (ax_cov, ax_size):
            ax.axvline(sets["served_alpha"], color="black", ls="--", lw=1, label=f"served set_alpha "
                       f"{sets['served_alpha']:g}")
            ax.grid(alpha=0.3)
        ax_cov.set(xlabel="alpha", ylabel="coverage (test half)", title="coverage vs alpha")
        ax_size.set(xlabel="alpha", ylabel="mean set size (test half)", title="mean set size vs alpha")
        ax_cov.legend(fontsize=8)
        fig.suptitle(f"{detector_label}: calibrated on {sets['n_calibration']} clean samples, measured on the "
                     f"other {sets['n_test']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "sets_vs_alpha.png", dpi=110)
        files.append("sets_vs_alpha.png")
    gate, msp, op = curves.get("gate"), curves.get("max_softmax"), curves.get("operating_point")
    if gate or msp or op:
        fig = Figure(figsize=(6.4, 4.6))
        ax = fig.subplots()
        if msp:
            ax.plot(msp["curve"]["coverage"], msp["curve"]["risk"], lw=1.3, ls="--", color="tab:green",
                    label="max softmax (not gated)")
        if gate:
            ax.plot(gate["curve"]["coverage"], gate["curve"]["risk"], lw=1.8, color="tab:blue",
                    label=f"gate score ({gate['score']}, trust-gated)")
        if op is not None and op["risk"] is not None:
            ax.plot([op["coverage"]], [op["risk"]], marker="*", ms=12, color="tab:red", ls="none",
                    label=f"served gate: coverage {op['coverage']:.3f}, risk {op['risk']:.4f}")
        if gate:
            ax.axhline(gate["risk_target"], color="grey", ls=":", lw=1, label=f"risk_target {gate['risk_target']:g}")
        ax.set(xlim=(0, 1.01), xlabel="coverage (accepted share of the clean set)",
               ylabel="risk (error rate among the accepted)", title=f"risk-coverage: {detector_label}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "risk_coverage.png", dpi=110)
        files.append("risk_coverage.png")
    return files
