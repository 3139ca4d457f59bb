"""Adaptive (white-box) attacks against a served composite detector: one module per attack
(:mod:`.cw`, :mod:`.orthogonal`, :mod:`.feature_match`, :mod:`.multitarget`, :mod:`.joint` (served model
and second opinion at once), :mod:`.transfer`),
the differentiable surrogate of the detector's statistic (:mod:`.surrogate`, the only module
that reads detector state), the shared descent loop (:mod:`.common`), the robust-detection
arithmetic (:mod:`.metrics`) and the command (:mod:`.run`, ``python -m benchmarks.adaptive``)."""
