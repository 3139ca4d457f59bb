"""``gga-fit``: fit a detector offline and write it into the artifact store.

The same steps as ``POST /fit``, without a server, so that fitting can run as a batch
job (a Kubernetes Job, a cron job) instead of inside a serving replica:

1. the model and its card, named exactly as for the server (one :class:`Settings` from
   the ``GGA_*`` environment; ``--artifact-dir``, ``--device`` and ``--batch-size``
   override ``GGA_ARTIFACT_DIR``, ``GGA_DEVICE`` and ``GGA_FIT_BATCH_SIZE``);
2. the data: an ``.npz`` with ``x`` (n, *input_shape) floats and ``y`` (n,) integer
   labels, optionally ``x_cal``/``y_cal``, or a separate ``--calibration`` file whose
   ``x``/``y`` are the calibration pair; read and validated by :mod:`service.fitdata`,
   as an upload is (no size limit: the files are the operator's own);
3. the options (``--preset``, ``--top-n``, ``--alpha``, defaults ``GGA_DETECTOR``,
   ``GGA_TOP_N``, ``GGA_ALPHA``) validated by :class:`service.fitjobs.FitOptions` and
   :func:`detectors.presets.build_detector` with the card's ``feature_layers``;
4. the fit, with a text progress bar on stderr (samples done / total, rate, ETA);
5. a new version written by :meth:`ArtifactStore.save_new` (temporary name, fsync,
   rename), and one JSON line on stdout: the fields of a ``GET /fit/{id}`` result plus
   the model and its fingerprint.

Exit status: 0 written; 2 bad arguments, configuration or data (nothing is written);
1 the fit or the write failed (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from detectors.fingerprint import model_fingerprint
from detectors.presets import PRESETS, build_detector
from service.app import resolve_device
from service.artifacts import ArtifactStore
from service.errors import ApiError
from service.fitdata import check_pair, load_npz, read_npz
from service.fitjobs import FitOptions, fit_result
from service.models import ModelLoadError, load_model
from service.settings import Settings, SettingsError

log = logging.getLogger("service.fitcli")

EXIT_OK, EXIT_FIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments, configuration or data: exit 2, nothing written."""


class FitFailed(Exception):
    """The fit or the write failed: exit 1, nothing written."""


class ProgressBar:
    """``progress(done, total)`` callback that draws a text bar on ``stream``.

    On a terminal the bar is redrawn in place (at most every ``interval`` seconds); on a
    pipe or a log (a Kubernetes Job) it prints a full line at most every
    ``log_interval`` seconds, plus the first and the last.
    """

    def __init__(self, stream: TextIO, label: str = "features", width: int = 30, interval: float = 0.2,
                 log_interval: float = 10.0, clock=time.monotonic) -> None:
        self.stream, self.label, self.width, self.clock = stream, label, width, clock
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.t0 = clock()
        self._last: float | None = None
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        final = done >= total
        if not final and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        line = self.render(done, total, now - self.t0)
        if self.tty:
            self.stream.write("\r" + line)
            self._open = True
            if final:
                self.stream.write("\n")
                self._open = False
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def render(self, done: int, total: int, elapsed: float) -> str:
        frac = done / total if total > 0 else 1.0
        filled = min(self.width, int(frac * self.width))
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else math.inf
        return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {frac:4.0%} "
                f"{rate:.1f} samples/s elapsed {_clock(elapsed)} ETA {_clock(eta)}")

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def _top_n(text: str) -> int | str:
    t = text.strip().lower()
    if t == "all":
        return "all"
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3 or 'all', got {text!r}") from None


def _alpha(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), e.g. 0.05; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gga-fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, metavar="TRAIN.npz",
                   help="x (n, *input_shape) float, y (n,) int labels; optionally x_cal, y_cal")
    p.add_argument("--calibration", type=Path, metavar="CAL.npz",
                   help="held-out calibration data: its x and y become x_cal, y_cal (not with x_cal in --data)")
    p.add_argument("--preset", choices=PRESETS, help="detector preset (default GGA_DETECTOR, else composite)")
    p.add_argument("--top-n", type=_top_n, metavar="N|all",
                   help="classes in the CSM: an integer >= 3, or 'all' (every class of the model); default "
                   "GGA_TOP_N, else the preset's choice (5 for composite and gga, all for paper)")
    p.add_argument("--alpha", type=_alpha, help="flag when trust < alpha (default GGA_ALPHA, else 0.05)")
    p.add_argument("--set-alpha", type=_alpha, help="prediction sets cover the label with probability >= 1 - "
                   "set_alpha (default 0.1)")
    p.add_argument("--risk-target", type=_alpha, help="the accept gate's error rate among accepted predictions "
                   "(default 0.01; given: the fit fails when the calibration data cannot support it)")
    p.add_argument("--delta", type=_alpha, help="the gate's bound holds with probability >= 1 - delta (default "
                   "0.05; given: as --risk-target)")
    p.add_argument("--batch-size", type=int, metavar="B", help="samples per batch (default GGA_FIT_BATCH_SIZE, 256)")
    p.add_argument("--artifact-dir", type=Path, metavar="DIR", help="artifact store (default GGA_ARTIFACT_DIR)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default GGA_DEVICE, else auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``gga-fit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except UsageError as exc:
        print(f"gga-fit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FitFailed as exc:
        print(f"gga-fit: fit failed, nothing written: {exc}", file=sys.stderr)
        return EXIT_FIT_FAILED
    print(json.dumps(result), flush=True)
    return EXIT_OK


def load_served_model(overrides: dict):
    """The settings (GGA_* environment plus ``overrides``) and the model as the server loads it:
    (settings, device, model, card); :class:`UsageError` when either is wrong. Shared by the
    offline commands (gga-fit, gga-eval)."""
    try:
        settings = Settings(**overrides)
    except SettingsError as exc:
        raise UsageError(f"{exc} (GGA_* environment or flags)") from exc
    if settings.model.torch_threads:
        torch.set_num_threads(settings.model.torch_threads)
    try:
        device = resolve_device(settings.model.device)
        model, card = load_model(settings, device)
    except (ModelLoadError, RuntimeError) as exc:
        raise UsageError(f"cannot load the model ({settings.model.name}): {exc}") from exc
    return settings, device, model, card


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; raises :class:`UsageError` or :class:`FitFailed`."""
    overrides = {k: v for k, v in (("artifact_dir", args.artifact_dir), ("device", args.device),
                                   ("fit_batch_size", args.batch_size)) if v is not None}
    settings, device, model, card = load_served_model(overrides)
    n_classes = len(card.class_names)

    top_n = settings.fit.top_n if args.top_n is None else (n_classes if args.top_n == "all" else args.top_n)
    alpha = args.alpha if args.alpha is not None else settings.fit.alpha
    try:
        options = FitOptions(preset=args.preset or settings.fit.preset, top_n=top_n, alpha=alpha,
                             set_alpha=args.set_alpha, risk_target=args.risk_target, delta=args.delta)
        _build(options, model, card)  # refuse options the model cannot take before reading any data
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    x, y, cal = _read_data(args.data, args.calibration, card.input_shape, n_classes)

    progress = None if args.no_progress else ProgressBar(sys.stderr)
    t0 = time.perf_counter()
    try:
        det = _build(options, model, card)
        cal_t = None if cal is None else (torch.from_numpy(cal[0]), torch.from_numpy(cal[1]))
        det.fit(torch.from_numpy(x), torch.from_numpy(y), batch_size=settings.fit.batch_size, progress=progress,
                calibration=cal_t)
    except Exception as exc:  # noqa: BLE001 - any failure of the fit is reported; nothing was written
        log.debug("fit failed", exc_info=True)
        raise FitFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if progress is not None:
            progress.close()
    fingerprint = model_fingerprint(model)
    store = ArtifactStore(settings.storage.artifact_dir, fingerprint)
    try:
        version, path = store.save_new(det)  # temporary name, fsync, rename: never a half-written version
    except Exception as exc:  # noqa: BLE001
        raise FitFailed(f"cannot write into {store.dir}: {type(exc).__name__}: {exc}") from exc
    return {**fit_result(det, version, os.path.abspath(path)), "model": card.name, "fingerprint": fingerprint,
            "wall_seconds": round(time.perf_counter() - t0, 3)}


def _build(options: FitOptions, model: torch.nn.Module, card):
    """The unfitted detector, as ``FitJobManager.build`` makes it for ``POST /fit``."""
    return options.configure(build_detector(
        options.preset, model, num_classes=len(card.class_names), top_n=options.top_n, alpha=options.alpha,
        layers=card.feature_layers, second_opinion=card.second_opinion))


def _read_data(data: Path, calibration: Path | None, input_shape: tuple[int, ...], n_classes: int):
    """x, y and the calibration pair, validated as a /fit upload is; UsageError names the file."""
    for path in (data, calibration):
        if path is not None and not path.is_file():
            raise UsageError(f"{path}: no such file")
    try:
        x, y, cal = load_npz(data, input_shape, n_classes, None)
    except ApiError as exc:
        raise UsageError(f"{data}: {exc.message}") from exc
    if calibration is not None:
        if cal is not None:
            raise UsageError(f"{data} already holds x_cal/y_cal and --calibration names {calibration}: use one")
        try:
            arrays = read_npz(calibration, None)
            if "x" not in arrays or "y" not in arrays:
                raise ApiError(422, "invalid_input", "the .npz must hold arrays 'x' (n, *input_shape) and 'y' (n,)")
            cal = check_pair(arrays["x"], arrays["y"], "x", "y", input_shape, n_classes)
        except ApiError as exc:
            raise UsageError(f"{calibration}: {exc.message}") from exc
    return x, y, cal


if __name__ == "__main__":
    sys.exit(main())
