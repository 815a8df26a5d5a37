"""``ConfigError``: a bad flag, key, file or combination, reported to the user as one line."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the flag, key or field and the fix.

    A ``ValueError`` so that code catching the libraries' own argument checks catches it too.
    """
