"""One exception type for every user-facing mistake, so the CLI can print one line and exit non-zero."""

from __future__ import annotations


class VlmscopeError(Exception):
    """A user-facing error: the message is one line that names the fix."""


class UnsupportedModelError(VlmscopeError):
    pass


class InputError(VlmscopeError):
    """Bad input: a missing file, a corrupt image, a prompt without an image, an out-of-range layer."""
