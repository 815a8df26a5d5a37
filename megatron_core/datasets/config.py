"""``GPTDatasetConfig``: what the GPT data pipeline needs to know, independent of any tokenizer."""
from __future__ import annotations

from dataclasses import dataclass

from .splits import parse_split


@dataclass(kw_only=True)
class GPTDatasetConfig:
    """Settings shared by every GPT dataset built for one training run."""

    seq_length: int
    eod: int  # end-of-document id (tokenizer.eod); samples span documents across it
    seed: int = 1234  # shuffles documents and samples
    data_path: list[str] | None = None  # Megatron's --data-path: ["PREFIX"] or ["0.3", "A", "0.7", "B"]
    mock: bool = False  # --mock-data: synthetic tokens, no files
    split: str = "969,30,1"  # train/valid/test weights over documents (Megatron's default)
    data_cache_path: str | None = None  # where index .npy files go; default: next to the data
    eod_mask_loss: bool = False  # zero the loss where the label is EOD
    pad: int = -1  # labels equal to this id get no loss (-1: no pad token)
    mock_vocab_size: int | None = None  # mock token ids lie in [0, this); default eod + 1
    mock_num_documents: int = 1000

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be positive, got {self.seq_length}")
        if isinstance(self.data_path, str):  # "0.3 A 0.7 B" given as one string
            self.data_path = self.data_path.split()
        if self.mock == bool(self.data_path):
            raise ValueError("give exactly one of --data-path PREFIX... and --mock-data")
        if self.data_path is not None:
            self.data_path = [str(p) for p in self.data_path]
        parse_split(self.split)  # reject a bad --split now rather than when datasets are built
        if self.mock:
            vocab = self.resolved_mock_vocab_size
            if vocab < 2 or not 0 <= self.eod < vocab:
                raise ValueError(
                    f"mock data needs 0 <= eod ({self.eod}) < mock vocab size ({vocab}), and a vocab of at least 2"
                )

    @property
    def resolved_mock_vocab_size(self) -> int:
        """Vocabulary size mock tokens are drawn from."""
        return self.mock_vocab_size if self.mock_vocab_size is not None else self.eod + 1
