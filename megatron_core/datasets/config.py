"""``GPTDatasetConfig``: what the GPT data pipeline needs to know, independent of any tokenizer."""
from __future__ import annotations

from dataclasses import dataclass

from .splits import parse_split

PER_SPLIT_FIELDS = ("train_data_path", "valid_data_path", "test_data_path")


@dataclass(kw_only=True)
class GPTDatasetConfig:
    """Settings shared by every GPT dataset built for one training run."""

    seq_length: int
    eod: int  # end-of-document id (tokenizer.eod); samples span documents across it
    seed: int = 1234  # shuffles documents and samples
    data_path: list[str] | None = None  # Megatron's --data-path: ["PREFIX"] or ["0.3", "A", "0.7", "B"]
    # Megatron's --train-data-path / --valid-data-path / --test-data-path: each split its own (weighted)
    # prefixes, every document of them; --split does not apply. A split without one gets no dataset.
    train_data_path: list[str] | None = None
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    mock: bool = False  # --mock-data: synthetic tokens, no files
    split: str = "969,30,1"  # train/valid/test weights over documents (Megatron's default)
    data_cache_path: str | None = None  # where index .npy files go; default: next to the data
    eod_mask_loss: bool = False  # zero the loss where the input token is EOD (the prediction across a boundary)
    # Megatron-LM's --reset-position-ids / --reset-attention-mask: positions restart at 0 after each EOD;
    # tokens after an EOD attend only to their own document (a block-diagonal causal mask per sample).
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    pad: int = -1  # labels equal to this id get no loss (-1: no pad token)
    mock_vocab_size: int | None = None  # mock token ids lie in [0, this); default eod + 1
    mock_num_documents: int = 1000

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be positive, got {self.seq_length}")
        for name in ("data_path", *PER_SPLIT_FIELDS):
            value = getattr(self, name)
            if isinstance(value, str):  # "0.3 A 0.7 B" given as one string
                value = value.split()
            setattr(self, name, [str(p) for p in value] if value else None)
        if [self.mock, bool(self.data_path), any(self.per_split_paths)].count(True) != 1:
            raise ValueError("give exactly one of --data-path PREFIX..., --train-data-path/--valid-data-path/"
                             "--test-data-path PREFIX... and --mock-data")
        parse_split(self.split)  # reject a bad --split now rather than when datasets are built
        if self.mock:
            vocab = self.resolved_mock_vocab_size
            if vocab < 2 or not 0 <= self.eod < vocab:
                raise ValueError(
                    f"mock data needs 0 <= eod ({self.eod}) < mock vocab size ({vocab}), and a vocab of at least 2"
                )

    @property
    def per_split_paths(self) -> list[list[str] | None]:
        """[train, valid, test] prefixes of Megatron's per-split flags (None where not given)."""
        return [getattr(self, name) for name in PER_SPLIT_FIELDS]

    @property
    def resolved_mock_vocab_size(self) -> int:
        """Vocabulary size mock tokens are drawn from."""
        return self.mock_vocab_size if self.mock_vocab_size is not None else self.eod + 1
