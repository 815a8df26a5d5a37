"""``ConfigError``: a bad flag, file or combination, reported to the user as one line."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the flag and the fix."""
