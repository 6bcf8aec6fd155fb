"""The one error type the user reads: bad input, said with what to do. Nothing is changed by it."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message tells the user what to do. The session is unchanged."""


class SessionEnded(UserError):
    """The conversation ended (tab closed, expired, cleared): nothing may write its files again."""
