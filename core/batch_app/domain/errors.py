"""Errors the domain raises for a caller's mistake or a state it cannot serve; the API maps each
kind to its HTTP status and OpenAI's error shape (api/errors.py), the CLI to a line."""

from __future__ import annotations


class DomainError(Exception):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(DomainError):
    """The request or its input file is wrong in a way the caller can fix."""


class NotFound(DomainError):
    def __init__(self, kind: str, object_id: str, param: str):
        super().__init__(f"No {kind} found with id '{object_id}'.", param=param, code="not_found")


class Conflict(DomainError):
    """The object is in a state that does not allow this (cancelling an ended batch)."""


class Gone(DomainError):
    """The object existed but what was asked of it has been deleted or has expired."""


class LimitReached(DomainError):
    """A project is at one of its limits (limits.py); it may try again once it holds less."""


class TooLarge(DomainError):
    """An upload past its size limit."""


class NoLiveWorker(DomainError):
    """Nothing serves the model right now; the caller may retry later."""
