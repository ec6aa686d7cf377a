"""One error family: the CLI turns any GgufmixError into a one-line message and a non-zero exit."""
from __future__ import annotations


class GgufmixError(Exception):
    """Base of every error a user can cause or fix; the message names the file or tensor."""

    exit_code = 1


class InputError(GgufmixError):
    """A model, imatrix, scores or plan file that is missing, unreadable or malformed."""

    exit_code = 2


class UsageError(GgufmixError):
    """A flag value that cannot work: a bad budget, type, regex or output path."""

    exit_code = 2


class BudgetError(GgufmixError):
    """The budget cannot be met with the allowed types; the message states the feasible range."""

    exit_code = 3


class EngineError(GgufmixError):
    """llama.cpp refused or failed an operation (quantize, load, evaluate)."""

    exit_code = 4


class VerifyError(GgufmixError):
    """The written file differs from the plan (a type fell back, or the size is off)."""

    exit_code = 5


class MissingDependencyError(GgufmixError):
    """An optional package a feature needs is not installed; the message gives the pip command."""

    exit_code = 6


class HubError(GgufmixError):
    """The Hugging Face Hub (or the HF_ENDPOINT stand-in) refused an upload or could not be reached."""

    exit_code = 7
