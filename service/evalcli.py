"""``gga-eval``: evaluate a fitted detector on your own in-distribution and OOD/attack data.

    gga-eval --in clean.npz --ood fashion=fashion.npz [--ood noise=noise.npz ...]
             (--detector DIR | --url http://host:port [--read-token T]) --out REPORT_DIR
             [--max-samples N] [--batch-size B] [--no-progress] [--explain]

Two ways to reach the detector:

- ``--detector DIR``: a saved detector folder (``detector.json`` + ``detector.safetensors``,
  GGA or composite, e.g. ``service/default_model/detector`` or a version ``v000N`` of the
  artifact store), scored in this process. The model is named exactly as for the server:
  one :class:`Settings` from the ``GGA_*`` environment; ``--model``, ``--model-weights``,
  ``--model-card`` and ``--device`` override ``GGA_MODEL``, ``GGA_MODEL_WEIGHTS``,
  ``GGA_MODEL_CARD`` and ``GGA_DEVICE``. A sample is flagged when trust < the served alpha
  (``GGA_SERVE_ALPHA``, else the detector's own), as the server does.
- ``--url``: a running service, scored through :class:`service.client.GGAClient`
  (``/info`` for the detector, ``/predict`` in batches of ``--batch-size``). A service
  with a read token (``GGA_READ_TOKEN``) needs it: ``--read-token``, else the
  ``GGA_READ_TOKEN`` of this environment (the admin token works too); the recorded
  command shows it as ``HIDDEN``.

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
``scores.npz`` (per set ``<set>.score``, ``.trust``, ``.flagged``, ``.label``, with
``--detector`` ``.logits``, and ``clean.y``), ``roc.png`` (all sets), ``trust_<set>.png`` (clean vs each set) and
``csm_<set>.png`` (the first sample's N x N CSM, predicted class first; skipped with a
note when the detector gives no CSM). With labels, the decisions' curves too
(:mod:`service.evaluation.conformal_curves`): coverage and mean set size vs alpha (calibrated on a
seeded half of the clean set, measured on the other) in ``sets_vs_alpha.png``, the risk-coverage
curve of the gate's score and of max softmax with the served operating point in
``risk_coverage.png``, a table on stderr and ``decision_curves`` in report.json; with ``--url``
only the operating point and max softmax (``/predict`` returns no logits).
Figures need matplotlib: ``pip install 'gga-trust[eval]'``.

Exit status: 0 report written; 2 bad arguments, settings or files (the message names
them); 1 the evaluation failed (the service unreachable or failing, the scoring raised,
the report could not be written).

The pieces live in :mod:`service.evaluation` (data, scoring, results, figures, report);
this module is the command: its arguments and the run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.evaluation.conformal_curves import decision_curves, summary_lines
from service.evaluation.data import CLEAN, load_set
from service.evaluation.errors import EvalFailed, UsageError
from service.evaluation.figures import draw_decision_curves, draw_figures, figure_class
from service.evaluation.report import write_report
from service.evaluation.results import COVERAGE, TPR, evaluate
from service.evaluation.scoring import LocalScorer, RemoteScorer, score_set

log = logging.getLogger("service.evalcli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
READ_TOKEN_ENV = "GGA_READ_TOKEN"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    p.add_argument("--explain", action="store_true", help="each detector component's p-value per sample too: "
                   "<set>.p_values in scores.npz, and per set the share of samples each component puts below "
                   "alpha in report.json (explain)")
    local = p.add_argument_group("with --detector: the model, as for the server (default: the GGA_* environment)")
    local.add_argument("--model", metavar="SPEC", help="like GGA_MODEL: mnist_cnn, cifar_resnet20, cifar_resnet56, "
                       "torchscript:<path> or factory:<module>:<function>")
    local.add_argument("--model-weights", type=Path, metavar="PATH", help="like GGA_MODEL_WEIGHTS")
    local.add_argument("--model-card", type=Path, metavar="PATH", help="like GGA_MODEL_CARD")
    local.add_argument("--device", choices=("auto", "cpu", "cuda"), help="like GGA_DEVICE (default auto)")
    remote = p.add_argument_group("with --url")
    remote.add_argument("--timeout", type=_positive_float, default=120.0, metavar="S",
                        help="seconds per HTTP request (default 120)")
    remote.add_argument("--read-token", default=None, metavar="TOKEN",
                        help="the service's read token (GGA_READ_TOKEN) or admin token, for /info and /predict "
                        "(default: GGA_READ_TOKEN of this environment; not needed when the service has none)")
    return p


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
    dec = doc["clean"].get("decisions")
    if dec:
        v = {k: "n/a" if dec.get(k) is None else f"{dec[k]:.4f}"
             for k in ("set_coverage", "mean_set_size", "accept_rate", "selective_risk")}
        print(f"gga-eval: prediction sets on the clean set: coverage {v['set_coverage']}, mean size "
              f"{v['mean_set_size']}; accept rate {v['accept_rate']}, selective risk {v['selective_risk']}",
              file=sys.stderr)
    for line in summary_lines(doc.get("decision_curves") or {}):
        print(f"gga-eval: {line}", file=sys.stderr)
    print(f"gga-eval: report written to {doc['report']}", file=sys.stderr)
    return EXIT_OK


def _redacted(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--read-token`` replaced by ``HIDDEN`` (the command goes into the report)."""
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("HIDDEN")
            hide = False
        elif a == "--read-token":
            out.append(a)
            hide = True
        elif a.startswith("--read-token="):
            out.append("--read-token=HIDDEN")
        else:
            out.append(a)
    return out


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
    if args.detector is not None and args.read_token is not None:
        raise UsageError("--read-token is the token of the service of --url; --detector scores in this process")
    if args.url is not None and args.read_token is None:
        args.read_token = os.environ.get(READ_TOKEN_ENV, "").strip() or None
    figure_class()  # fail before any scoring when matplotlib is missing

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
        clean_scores = score_set(scorer, clean, args.batch_size, progress, args.explain)
        scored = []
        for ds in ood:
            scored.append((ds, score_set(scorer, ds, args.batch_size, progress, args.explain)))
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
    curves, curve_notes = decision_curves(clean, clean_scores, scorer.decisions, scorer.alpha)
    notes += curve_notes
    right = clean_scores.label == clean.y if clean.y is not None else np.ones(len(clean.x), bool)
    det = scorer.info
    label = f"{det['kind']} {det.get('version') or ''}".strip()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        figures, fig_notes = draw_figures(args.out, clean_scores.score[right], clean_scores, scored, results,
                                          scorer.alpha, scorer.class_names, label)
        notes += fig_notes
        figures += draw_decision_curves(args.out, curves, label)
        doc = {
            "tool": "gga-eval", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["gga-eval", *_redacted(argv)]), "mode": scorer.mode, "model": scorer.model_name,
            "device": scorer.device_name, "batch_size": args.batch_size, "max_samples": args.max_samples,
            "detector": det, "tpr": TPR, "coverage": COVERAGE, **results, "decision_curves": curves,
            "figures": figures, "notes": notes,
            "wall_seconds": round(time.perf_counter() - t0, 3),
        }
        if args.explain:
            doc["explain"] = _explain_summary(det.get("components"), scorer.alpha, clean_scores, scored)
        report = write_report(args.out, doc, clean, clean_scores, scored)
    except OSError as exc:
        raise EvalFailed(f"cannot write the report into {args.out}: {exc}") from exc
    doc["report"] = str(report)
    return doc


def _explain_summary(components, alpha: float, clean_scores, scored) -> dict:
    """Per set and component: the share of samples whose p-value is below alpha, and the median p-value."""
    sets = {}
    for name, sc in (("clean", clean_scores), *((ds.name, s) for ds, s in scored)):
        if sc.p_values is None:
            continue
        p = sc.p_values
        sets[name] = {c: {"below_alpha": float(np.mean(p[:, k] < alpha)), "median_p": float(np.nanmedian(p[:, k]))}
                      for k, c in enumerate(components or [])}
    return {"components": components, "alpha": alpha, "sets": sets}


if __name__ == "__main__":
    sys.exit(main())
