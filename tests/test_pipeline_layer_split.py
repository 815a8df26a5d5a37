"""Which layers each (virtual) pipeline stage holds."""
import pytest

from megatron_core.pipeline_parallel.layer_split import chunk_layer_counts, layer_range


def test_uniform_and_interleaved_split():
    counts = chunk_layer_counts(8, 2, 2)
    assert counts == [2, 2, 2, 2]
    # rank 0 holds chunks 0 and 2 (layers 0-1 and 4-5); rank 1 chunks 1 and 3.
    assert [layer_range(counts, 2, 0, v) for v in (0, 1)] == [(0, 2), (4, 2)]
    assert [layer_range(counts, 2, 1, v) for v in (0, 1)] == [(2, 2), (6, 2)]


def test_lighter_first_and_last_stage():
    counts = chunk_layer_counts(8, 4, first_stage_layers=1, last_stage_layers=1)
    assert counts == [1, 3, 3, 1]
    assert [layer_range(counts, 4, r) for r in range(4)] == [(0, 1), (1, 3), (4, 3), (7, 1)]


def test_layers_that_do_not_split_are_rejected():
    with pytest.raises(ValueError, match=r"--num-layers 6 does not split evenly over "
                                         r"--pipeline-model-parallel-size 4 = 4 chunks"):
        chunk_layer_counts(6, 4)
    with pytest.raises(ValueError, match="does not split evenly over the remaining 2 chunks"):
        chunk_layer_counts(8, 4, first_stage_layers=1, last_stage_layers=2)
    with pytest.raises(ValueError, match="must be non-negative and sum to --num-layers 8"):
        chunk_layer_counts(8, 2, layers_per_chunk=[3, 4])


def test_first_and_last_stage_counts_from_two_chunks_on():
    """Two chunks (PP 2, or PP 1 with 2 virtual stages) are the fewest with a first and a last stage."""
    assert chunk_layer_counts(5, 2, first_stage_layers=2) == [2, 3]
    assert chunk_layer_counts(5, 2, first_stage_layers=1, last_stage_layers=4) == [1, 4]
    assert chunk_layer_counts(5, 1, 2, last_stage_layers=1) == [4, 1]
    with pytest.raises(ValueError, match="first/last stage layer counts need at least two pipeline chunks"):
        chunk_layer_counts(5, 1, first_stage_layers=2)
