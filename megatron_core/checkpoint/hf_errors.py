"""Errors of the Hugging Face converters, and the check of config fields they rely on."""


class UnsupportedModel(ValueError):
    """A Hugging Face architecture or option the converter cannot represent; the message says which."""


def resolved(value: int | None, field: str) -> int:
    """A ``TransformerConfig`` size that ``__post_init__`` fills in (``kv_channels``, ``num_query_groups``,
    ``ffn_hidden_size``); ValueError naming the field when it is still None."""
    if value is None:
        raise ValueError(f"TransformerConfig.{field} is None; TransformerConfig.__post_init__ fills it in, so build "
                         "the config with TransformerConfig(...) instead of resetting the field afterwards")
    return value
