"""Errors of the Hugging Face converters."""


class UnsupportedModel(ValueError):
    """A Hugging Face architecture or option the converter cannot represent; the message says which."""
