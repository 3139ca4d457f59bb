"""Run the adaptive attack suite against a saved composite detector and write its table.

    python -m benchmarks.adaptive --detector service/default_model/detector \\
        --model service/default_model --data mnist --split test --n 200 --steps 500 --restarts 5 \\
        --attacks cw,orthogonal,feature_match,multitarget,joint,transfer \\
        --out benchmarks/results/adaptive_mnist_default

writes ``<out>.json`` (every setting, per-attack outcomes, sanity checks) and ``<out>.md``.

Any saved composite (``--data npz``): the model is loaded as the server loads it (``GGA_MODEL``,
``GGA_MODEL_WEIGHTS``, ``GGA_MODEL_CARD``; or ``--model`` for a folder with ``model_card.json``
naming a built-in architecture and ``model.safetensors``), the attacked inputs are the first
``--n`` of ``--inputs`` (an ``.npz`` with ``x`` (n, *input_shape) and integer ``y``, as for
``gga-fit``; ``--split`` only labels them), and ``--public`` (the same format) holds the images an
attacker may have: the first ``--pool`` are the guides, the next 2 × ``--transfer-fit`` the
transfer attacker's fit and calibration halves. E.g. a CIFAR-10 composite:

    GGA_MODEL=cifar_resnet56 GGA_MODEL_WEIGHTS=../shared/data/cifar10_resnet/resnet56-4bfd9763.th \
    python -m benchmarks.adaptive --data npz --detector DIR --inputs test.npz --public train.npz \
        --split test --budgets linf:0.0314 --out benchmarks/results/adaptive_cifar10

Splits (MNIST): ``test`` is t10k; ``val`` is the model's 10% validation part after the
detector's ``n_calibration`` images, in order (the bundled detector, ``detectors/zoo/fit_default.py``,
calibrates on the first 4,000; the robust second opinion held out the first 5,000, so the first
1,000 ``val`` images are new to the model, the detector and the second opinion). ``--n`` inputs
come from the split (seeded draw on ``test``); the feature-matching guides (``--pool``) and the
transfer attacker's own fit come from the model's training part minus the detector's fit subset
(public data the attacker may hold).

Robust detection (:mod:`benchmarks.adaptive.metrics`) per attack and for the best of all,
at every budget in ``--budgets``. Sanity checks (Carlini et al. 2019, "On Evaluating
Adversarial Robustness"), with the CW attack (from the clean input) and the guided attack (from
a projected image of another class) on the first ``--sanity-n`` correctly classified inputs at
the first budget (run right after it): success rate over an ε sweep (must rise to 100%), at
steps/4, steps/2 and steps (must not fall), unbounded (ε = 1 in L∞ covers the whole image box:
must reach 100%), and CW without the detector term (c = 0: the classifier's own robust accuracy,
expected ≈ 0%).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.adaptive import cw, feature_match, guided, joint, multitarget, orthogonal, transfer
from benchmarks.adaptive.common import Budget, Context, Judge, Tracker
from benchmarks.adaptive.metrics import summary
from benchmarks.adaptive.surrogate import GGA_MODES, Surrogate
from detectors.composite import CompositeDetector
from detectors.datasets import load_idx_split

ATTACKS = ("cw", "orthogonal", "feature_match", "multitarget", "joint", "guided", "transfer")
SANITY_ATTACKS = ("cw", "guided")
DEFAULT_BUDGETS = {"mnist": ("linf:0.3", "l2:2.0")}


def parse_budget(text: str) -> Budget:
    try:
        norm, eps = text.split(":")
        return Budget(norm, float(eps))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a budget is NORM:EPS with NORM linf or l2, e.g. linf:0.3; got {text!r}"
                                         f" ({exc})") from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", type=Path, required=True, help="a saved composite detector folder")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (model.safetensors + model_card.json naming a built-in architecture); "
                        "--data npz without it: the model the GGA_MODEL* environment names, as the server loads it")
    p.add_argument("--data", choices=("mnist", "npz"), default="mnist")
    p.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/mnist"))
    p.add_argument("--inputs", type=Path, default=None, help="--data npz: the attacked inputs (x, y)")
    p.add_argument("--public", type=Path, default=None,
                   help="--data npz: images the attacker may hold (x, y): guides, then the transfer fit")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--pool", type=int, default=500, help="feature-matching guide images")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=None)
    p.add_argument("--steps-for", default="", help="per-attack steps/restarts, e.g. multitarget=100x1,cw=200x3")
    p.add_argument("--guided-classes", type=int, default=None,
                   help="target classes per input for the guided attack, nearest guide first (default: all)")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--gga", choices=GGA_MODES, default="omit")
    p.add_argument("--judge-every", type=int, default=5)
    p.add_argument("--transfer-fit", type=int, default=5000, help="images the transfer attacker fits on")
    p.add_argument("--transfer-seed", type=int, default=1)
    p.add_argument("--sanity-n", type=int, default=50, help="inputs for the sanity checks (0: skip them)")
    p.add_argument("--sanity-steps", type=int, default=100)
    p.add_argument("--sanity-only", action="store_true", help="run only the sanity checks (at the first budget) "
                   "and add them to an existing <out>.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = p.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in args.attacks if a not in ATTACKS]
    if bad or not args.attacks:
        p.error(f"--attacks takes a comma-separated list of {ATTACKS}, got {bad or args.attacks}")
    if args.data == "mnist" and args.model is None:
        p.error("--data mnist needs --model (the folder of the MNIST model)")
    if args.data == "npz" and (args.inputs is None or args.public is None):
        p.error("--data npz needs --inputs and --public")
    if args.data == "npz" and args.budgets is None:
        p.error("--data npz needs --budgets (e.g. linf:0.0314 for CIFAR-10's 8/255)")
    args.budgets = args.budgets or [parse_budget(b) for b in DEFAULT_BUDGETS[args.data]]
    args.per_attack = {}
    for item in filter(None, args.steps_for.split(",")):
        try:
            name, spec = item.split("=")
            s, r = spec.split("x")
            args.per_attack[name] = (int(s), int(r))
        except ValueError:
            p.error(f"--steps-for takes NAME=STEPSxRESTARTS items, got {item!r}")
    if args.n < 1 or args.steps < 1 or args.restarts < 1:
        p.error("--n, --steps and --restarts must be >= 1")
    return args


def load_model(model_dir: Path | None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, frozen; its card as a dict) loaded as the server loads it: from a folder
    whose ``model_card.json`` names a built-in architecture (with ``model.safetensors``), or (``model_dir``
    None) from the GGA_MODEL* environment."""
    from service.fitcli import UsageError, load_served_model

    overrides: dict = {"device": "cpu"}
    card: dict = {}
    if model_dir is not None:
        if not (model_dir / "model_card.json").is_file():
            raise SystemExit(f"{model_dir} holds no model_card.json (and model.safetensors)")
        card = json.loads((model_dir / "model_card.json").read_text())
        overrides |= {"model": str(card.get("architecture")), "model_weights": str(model_dir / "model.safetensors"),
                      "model_card": str(model_dir / "model_card.json")}
    try:
        _, _, model, served_card = load_served_model(overrides)
    except UsageError as exc:
        raise SystemExit(f"cannot load the model ({model_dir or 'the GGA_MODEL* environment'}): {exc}") from exc
    card = {**card, "name": served_card.name, "class_names": list(served_card.class_names)}
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, card


def npz_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x (float32, in [0, 1] as given) and y (int64) of an .npz (pickles refused)."""
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise SystemExit(f"{path}: the .npz must hold arrays 'x' (n, *input_shape) and 'y' (n,)")
        x, y = f["x"].astype(np.float32), f["y"].astype(np.int64)
    if len(x) != len(y):
        raise SystemExit(f"{path}: x holds {len(x)} images, y {len(y)} labels")
    return x, y


def mnist_splits(data_dir: Path, card: dict, meta_fit: dict, det_seed: int) -> dict[str, np.ndarray]:
    """Index sets into MNIST train: ``unused`` (the model's training part minus the detector's fit
    subset) and the label arrays; the recipe of ``detectors/zoo/fit_default.py``."""
    x_all, y_all = load_idx_split(data_dir, "train")
    perm = np.random.default_rng(card["seed"]).permutation(len(x_all))
    n_val = len(x_all) // 10
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    n_fit = meta_fit["n_samples"] - meta_fit["n_calibration"]
    pick = np.random.default_rng(det_seed).permutation(train_idx)[:n_fit]
    unused = np.setdiff1d(train_idx, pick)
    return {"x": x_all, "y": y_all, "unused": unused, "val_cal_rest": val_idx[meta_fit["n_calibration"]:]}


def select_data(args: argparse.Namespace, card: dict, meta: dict) -> dict[str, np.ndarray]:
    """The attacked inputs (``x``, ``y``: the first ``--n`` of the split), the guide pool (``pool_x``,
    ``pool_y``) and the transfer attacker's images (``transfer_x``, ``transfer_y``: fit half, then
    calibration half), as the module docstring describes for each ``--data`` and ``--split``."""
    rng = np.random.default_rng(args.seed)
    if args.data == "npz":
        x_src, y_src = npz_pair(args.inputs)
        take = np.arange(len(x_src))
        pub_x, pub_y = npz_pair(args.public)
        pool_x, pool_y = pub_x[: args.pool], pub_y[: args.pool]
        sp = {"x": pub_x, "y": pub_y}
        transfer_idx = np.arange(args.pool, min(len(pub_x), args.pool + 2 * args.transfer_fit))
        if len(transfer_idx) < 2 and "transfer" in args.attacks:
            raise SystemExit(f"{args.public} holds {len(pub_x)} images: none left for the transfer fit after "
                             f"--pool {args.pool}")
    elif args.split == "test":
        sp = mnist_splits(args.data_dir, card, meta["fit"], meta["config"]["seed"])
        unused = rng.permutation(sp["unused"])
        xt, yt = load_idx_split(args.data_dir, "t10k")
        order = rng.permutation(len(xt))
        x_src, y_src, take = xt, yt, order
        transfer_idx = unused[: 2 * args.transfer_fit]
        pool_x, pool_y = xt[order[args.n: args.n + args.pool]], yt[order[args.n: args.n + args.pool]]
    else:
        sp = mnist_splits(args.data_dir, card, meta["fit"], meta["config"]["seed"])
        unused = rng.permutation(sp["unused"])
        # the validation part after the calibration images, in order: neither the model nor the
        # detector saw them (nor, for the bundled default, the robust second opinion: it held out
        # the first 5,000 of the same permutation and the detector calibrates on the first 4,000)
        x_src, y_src = sp["x"], sp["y"]
        take = sp["val_cal_rest"]
        if len(take) < args.n:
            raise SystemExit(f"the validation part holds {len(take)} images after the calibration, --n {args.n}")
        pool_x, pool_y = sp["x"][unused[: args.pool]], sp["y"][unused[: args.pool]]  # public guide images
        transfer_idx = unused[args.pool: args.pool + 2 * args.transfer_fit]
    return {"x": x_src[take[: args.n]], "y": y_src[take[: args.n]], "pool_x": pool_x, "pool_y": pool_y,
            "transfer_x": sp["x"][transfer_idx], "transfer_y": sp["y"][transfer_idx]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.0f}s] {msg}", flush=True)

    model, card = load_model(args.model)
    det = CompositeDetector.load(args.detector, model)
    meta = json.loads((args.detector / "detector.json").read_text())
    data = select_data(args, card, meta)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    pool_x, pool_y = torch.from_numpy(data["pool_x"]), torch.from_numpy(data["pool_y"])

    sur = Surrogate(det, temperature=args.temperature, gga=args.gga)
    clean = det.score(x, batch_size=256)
    correct = clean.label == y
    pool_clean = det.score(pool_x, batch_size=256)
    keep = (pool_clean.label == pool_y) & ~pool_clean.flagged
    pool_x, pool_y = pool_x[keep], pool_y[keep]
    log(f"{args.split}: {len(x)} inputs, {int(correct.sum())} correct, {int(clean.flagged.sum())} flagged clean; "
        f"{len(pool_x)} guides")
    xc, yc = x[correct], y[correct]

    own = None

    def own_detector():
        """The transfer attacker's detector, fitted when first needed."""
        nonlocal own
        if own is None:
            xs, ys = data["transfer_x"], data["transfer_y"]
            half = min(args.transfer_fit, len(xs) // 2)
            t0 = time.time()
            own = transfer.fit_own(model, torch.from_numpy(xs[:half]), torch.from_numpy(ys[:half]),
                                   torch.from_numpy(xs[half:]), torch.from_numpy(ys[half:]),
                                   preset=det.preset or "composite", num_classes=len(card["class_names"]),
                                   layers=det.config.layers, seed=args.transfer_seed,
                                   second_opinion=det.config.second_opinion)
            log(f"transfer attacker's detector fitted on {half} + {len(xs) - half} images in {time.time() - t0:.0f}s")
        return own

    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("budgets", "per_attack")},
               "budgets": [f"{b.norm}:{b.eps}" for b in args.budgets], "per_attack": args.per_attack,
               "detector": {"path": str(args.detector), "preset": det.preset, "components": det.component_names,
                            "threshold": det.threshold, "alpha": det.alpha},
               "host": {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
                        "threads": args.threads},
               "runs": {}}
    if args.sanity_only:
        previous = json.loads(Path(f"{args.out}.json").read_text())
        previous["sanity"] = sanity_checks(sur, xc[: args.sanity_n], yc[: args.sanity_n], args.budgets[0],
                                           args.sanity_steps, args.judge_every, log, pool_x, pool_y)
        _write(args.out, previous)
        return previous
    for budget in args.budgets:
        broken_c: dict[str, torch.Tensor] = {}
        seconds, judged = {}, {}
        for name in args.attacks:
            steps, restarts = args.per_attack.get(name, (args.steps, args.restarts))
            judge = Judge(sur)
            ctx = Context(sur, judge, budget, steps=steps, restarts=restarts, judge_every=args.judge_every,
                          log=lambda m, b=budget: log(f"{b.norm}:{b.eps} {m}"))
            t0 = time.time()
            tr = run_attack(name, ctx, xc, yc, pool_x=pool_x, pool_y=pool_y, guided_classes=args.guided_classes,
                            own_detector=own_detector)
            found = tr.found & budget.inside(tr.x_point, xc)
            broken_c[name] = found
            seconds[name] = round(time.time() - t0, 1)
            judged[name] = judge.calls
            log(f"{budget.norm}:{budget.eps} {name}: {int(found.sum())}/{len(xc)} broken in {seconds[name]:.0f}s")
            broken = {k: _expand(v, correct) for k, v in broken_c.items()}
            key = f"{budget.norm}:{budget.eps}"
            results["runs"][key] = {**summary(correct, clean.flagged, broken), "seconds": seconds,
                                    "inputs_judged": judged,
                                    "broken_index": {k: torch.nonzero(v)[:, 0].tolist() for k, v in broken.items()}}
            _write(args.out, results)  # after every attack: a run cut short keeps what it measured
        if args.sanity_n > 0 and "sanity" not in results:  # after the first budget, before the others
            results["sanity"] = sanity_checks(sur, xc[: args.sanity_n], yc[: args.sanity_n], budget,
                                              args.sanity_steps, args.judge_every, log, pool_x, pool_y)
        _write(args.out, results)
    results["seconds"] = round(time.time() - t_start, 1)
    _write(args.out, results)
    log(f"wrote {args.out}.json and {args.out}.md")
    return results


def run_attack(name: str, ctx: Context, x: torch.Tensor, y: torch.Tensor, *, pool_x: torch.Tensor,
               pool_y: torch.Tensor, guided_classes: int | None, own_detector: Callable[[], object]) -> Tracker:
    """One attack of :data:`ATTACKS` on the correctly classified inputs x, y (``own_detector()``: the
    transfer attacker's fitted detector, fitted on first use)."""
    if name == "cw":
        return cw.attack(ctx, x, y)
    if name == "orthogonal":
        return orthogonal.attack(ctx, x, y)
    if name == "feature_match":
        return feature_match.attack(ctx, x, y, pool_x=pool_x, pool_y=pool_y)
    if name == "multitarget":
        return multitarget.attack(ctx, x, y)
    if name == "joint":
        return joint.attack(ctx, x, y)
    if name == "guided":
        return guided.attack(ctx, x, y, pool_x=pool_x, pool_y=pool_y, classes_per_input=guided_classes)
    if name == "transfer":
        return transfer.attack(ctx, x, y, own_detector=own_detector())
    raise ValueError(f"unknown attack {name!r}: one of {ATTACKS}")


def sanity_checks(sur: Surrogate, x: torch.Tensor, y: torch.Tensor, budget: Budget, steps: int,
                  judge_every: int, log, pool_x: torch.Tensor, pool_y: torch.Tensor) -> dict:
    """Success rates on x of the CW attack (one round, c = 0.1) and of the guided attack (one restart),
    with the step size of ``budget``: over an ε sweep, over steps and unbounded; and of CW without the
    detector term (c = 0: the classifier alone)."""
    def rate(name: str, b: Budget, n_steps: int, c0: float = 0.1) -> dict:
        judge = Judge(sur)
        ctx = Context(sur, judge, b, steps=n_steps, restarts=1, judge_every=judge_every, step_eps=budget.eps)
        if name == "cw":
            tr = cw.attack(ctx, x, y, c0=c0, search=False)
        else:
            tr = guided.attack(ctx, x, y, pool_x=pool_x, pool_y=pool_y)
        found = tr.found & b.inside(tr.x_point, x)
        with torch.no_grad():
            fooled = sur.model(tr.x_point).argmax(dim=1) != y
        return {"success": float(found.float().mean()), "misclassified": float(fooled.float().mean())}

    out: dict = {"n": len(x), "budget": f"{budget.norm}:{budget.eps}", "steps": steps, "attacks": {}}
    scales = (0.25, 0.5, 1.0, 1.5, 2.0)
    cap = 1.0 if budget.norm == "linf" else 28.0
    sweep = [round(min(budget.eps * s, cap), 4) for s in scales]
    for name in SANITY_ATTACKS:
        checks = {"eps_sweep": {str(eps): rate(name, Budget(budget.norm, eps), steps) for eps in sweep},
                  "steps_sweep": {str(max(1, steps // d)): rate(name, budget, max(1, steps // d)) for d in (4, 2, 1)},
                  "unbounded": rate(name, Budget(budget.norm, cap), steps)}
        out["attacks"][name] = checks
        log(f"sanity {name}: {checks}")
    # without the detector term: the classifier's robust accuracy is 1 - misclassified
    no_det = rate("cw", budget, steps, c0=0.0)
    out["no_detector_term"] = {**no_det, "classifier_robust_accuracy": 1.0 - no_det["misclassified"]}
    log(f"sanity no detector term {out['no_detector_term']}")
    return out


def sanity_by_attack(sanity: dict) -> dict[str, dict]:
    """The per-attack sanity checks of a result (results written before the guided attack hold CW's only)."""
    return sanity.get("attacks") or {"cw": {k: sanity[k] for k in ("eps_sweep", "steps_sweep", "unbounded")}}


def _expand(v: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    full = torch.zeros(len(correct), dtype=torch.bool)
    full[correct] = v
    return full


def _write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{out}.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Adaptive (white-box) attacks: {results['detector']['path']}", "",
             f"Split `{s['split']}`, n = {s['n']}, steps × restarts = {s['steps']} × {s['restarts']}"
             + (f" (per attack: {results['per_attack']})" if results["per_attack"] else "")
             + f", smoothing temperature {s['temperature']}, GGA in the surrogate: `{s['gga']}`, "
             f"threshold {results['detector']['threshold']:.4f} (alpha {results['detector']['alpha']}).", "",
             "Robust detection = 1 − (correctly classified inputs for which the attack found a point inside the "
             "ball that is misclassified and not flagged) / (correctly classified inputs).", ""]
    for key, run in results["runs"].items():
        lines += [f"## Budget {key}", "",
                  f"{run['n']} inputs, {run['n_correct']} classified correctly, clean flag rate "
                  f"{100 * run['clean_flag_rate']:.1f}%.", "",
                  "| attack | broken | robust detection | seconds | inputs judged |", "|---|---|---|---|---|"]
        for name, row in run["attacks"].items():
            lines.append(f"| {name} | {row['broken']} | {100 * row['robust_detection']:.1f}% | "
                         f"{run['seconds'].get(name, '')} | {run['inputs_judged'].get(name, '')} |")
        lines.append("")
    if "sanity" in results:
        san = results["sanity"]
        lines += [f"## Sanity checks (CW: one round, c = 0.1; guided: one restart; {san['n']} inputs, {san['budget']}, "
                  f"{san['steps']} steps)",
                  "", "| attack | check | setting | success (misclassified, unflagged) | misclassified |",
                  "|---|---|---|---|---|"]
        for name, checks in sanity_by_attack(san).items():
            for eps, r in checks["eps_sweep"].items():
                lines.append(f"| {name} | ε sweep | ε = {eps} | {100 * r['success']:.0f}% | "
                             f"{100 * r['misclassified']:.0f}% |")
            for st, r in checks["steps_sweep"].items():
                lines.append(f"| {name} | steps | {st} | {100 * r['success']:.0f}% | {100 * r['misclassified']:.0f}% |")
            r = checks["unbounded"]
            lines.append(f"| {name} | unbounded | whole box | {100 * r['success']:.0f}% | "
                         f"{100 * r['misclassified']:.0f}% |")
        r = san["no_detector_term"]
        lines.append(f"| cw | no detector term | c = 0 | {100 * r['success']:.0f}% | {100 * r['misclassified']:.0f}% "
                     f"(classifier robust accuracy {100 * r['classifier_robust_accuracy']:.0f}%) |")
        lines.append("")
    return "\n".join(lines)
