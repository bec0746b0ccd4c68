"""Errors qcompile raises on bad input. Each message names the problem and the fix."""

from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""


class RecipeError(QCompileError, ValueError):
    """A recipe is unknown, malformed, or cannot apply to the given model."""


class NoLinearSelectedError(RecipeError):
    """A recipe selected no linear layer of the model."""


class CaptureError(QCompileError, RuntimeError):
    """The model could not be captured with torch.export."""


class WeightError(QCompileError, ValueError):
    """A weight cannot be quantized (NaN/Inf, wrong rank)."""


class CheckpointError(QCompileError, ValueError):
    """A checkpoint folder or file is missing, malformed, corrupted or unsupported."""
