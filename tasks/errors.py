"""The one error type for "the user's input cannot be used", whichever stage finds out.

A spec, a model file, a data source, a checkpoint or a user function that is wrong is bad input: the
CLI reports it as one line naming the file (exit code 2) and nothing is registered. Every other
exception is a failure of int8flow or of the machine (exit code 1).
"""

from __future__ import annotations


class InputError(ValueError):
    """The user's input (spec, model, data, checkpoint, user code) cannot be used; the message names it."""
