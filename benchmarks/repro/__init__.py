"""Reproduce the paper's Tables 1–3 (Schwinn et al., UAI 2021), find what drives GGA, and
measure the composite detector against it and every baseline.

    python -m benchmarks.reproduce --dataset mnist --data-dir ../shared/data [--quick] [--cache-dir DIR]
    python -m benchmarks.reproduce --dataset cifar10 --data-dir ../shared/data --n-test 500

One run, one data set. It writes ``<out>/<dataset>.json`` (every number, the command,
seed, runtime, machine, torch version, sample counts), ``<out>/<dataset>_arrays.npz``
(the scores behind the figures) and then renders ``<out>/REPORT.md`` and the PNG
figures with :mod:`benchmarks.report` (figures need the optional ``matplotlib``).

Stages (one module each):

- :mod:`~benchmarks.repro.setup`: sizes, model, fit / validation / test sources;
- :mod:`~benchmarks.repro.attacks_stage`: the splits (OOD sets, successful attacks,
  misclassified clean images), built or read from ``--cache-dir``;
- :mod:`~benchmarks.repro.csms`: the CSMs of every gradient family and set, once;
- :mod:`~benchmarks.repro.methods`: baselines and GGA variants;
- :mod:`~benchmarks.repro.validation`: model selection on the validation split;
- :mod:`~benchmarks.repro.composite_stage`: the composite detector and its ablations;
- :mod:`~benchmarks.repro.evaluate`: metrics; :mod:`~benchmarks.repro.output`: files;
- :mod:`~benchmarks.repro.main`: the pipeline.

Protocol (details in the report):

- In-distribution: a seeded sample of the test set (MNIST test; CIFAR-10: the JPEG-q75
  test copy, see ``../shared/data/README.md``). The positives of every metric are the
  *correctly classified* clean samples; the attacks start from them too. The clean
  samples the model gets wrong form the set ``misclassified``: the misclassification
  metrics (AUROC wrong vs right, AURC, risk at 95% coverage) use it; the pooled AUROC
  of Table 1 does not.
- OOD: Fashion-MNIST test (MNIST) or Fashion-MNIST resized to 32×32 and tiled to RGB
  (CIFAR-10, a cross-data-set stand-in: SVHN is not available), uniform noise U[0,1],
  Gaussian noise clip(N(0.5, 1), 0, 1) (and the unclipped N(0.5, 1) as an extra set).
- Attacks (``benchmarks.attacks``), only successful ones count: uniform noise in the
  ε-ball, PGD ℓ∞ and ℓ2, random rotations, B&B ℓ∞ / ℓ2, and the adaptive T-SCE, T-MSE, CSA.
- Methods, all fitted on training data only: MSP, ODIN, energy, Mahalanobis, GGA in the
  paper's configuration and its variants, −mean(S1) alone, the composite detector
  (the served preset), its ablations and the multi-layer Mahalanobis sum. CSMs are
  computed once per *gradient family* (``plain``: the library default; ``rescale``:
  logits rescaled to max |z| = 10; ``naive``: float32 cotangents p − e_i as in the
  official code and the library before its cancellation fix, or ``precise`` when the
  library lacks that fix), all through ``detectors.csm.cosine_similarity_maps``, for all
  classes, and every N-by-N top-N block, channel-max reduction, feature set and LODA
  setting is derived from them (the top-N block of the full CSM equals the top-N CSM
  exactly).
- Model selection: every GGA choice (the factorial over rescale / softmax feature / bins /
  standardisation / fit data / top-N) is made on a VALIDATION split (MNIST: the
  model's held-out 10% of train, Fashion-MNIST *train* images, fresh noise, attacks on
  validation images); the composite's defaults were chosen on the same validation split
  (``benchmarks/select_composite.py``); the test numbers are computed once, for
  pre-declared variants and the validation-selected configurations.
"""
