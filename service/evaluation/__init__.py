"""The pieces of ``gga-eval`` (:mod:`service.evalcli`, the command), one concern per module:

- :mod:`.errors`: the two failures of the command (bad input: exit 2; the evaluation failed: exit 1);
- :mod:`.data`: the ``.npz`` sets, read and validated against the model's input shape and classes;
- :mod:`.scoring`: a saved detector scored in this process, or a running service through
  :class:`service.client.GGAClient`, set by set in batches;
- :mod:`.results`: the numbers of the report, from :mod:`detectors.metrics`;
- :mod:`.figures`: the ROC curves, trust histograms and CSM examples (matplotlib);
- :mod:`.report`: ``report.md``, ``report.json`` and ``scores.npz``.
"""
