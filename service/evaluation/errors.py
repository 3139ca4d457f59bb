"""The two ways ``gga-eval`` fails: :class:`UsageError` (exit 2) and :class:`EvalFailed` (exit 1)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments, settings or files: exit 2."""


class EvalFailed(Exception):
    """The evaluation could not be completed: exit 1."""
