"""The int8 embedding lookup kernel (cpu_int8_embedding.h): the rows of an Int8Embedding equal
its PyTorch lookup bit for bit, in both layouts the matrix is held in (row-major as loaded, the
w8 lanes layout once a tied LM head's kernel repacked it) and every activation dtype."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.embedding import Int8Embedding
from fitserve.quant import packing

kernels = cpu_kernels.get()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels not built")


def embedding_in(layout: str, vocab: int, hidden: int, dtype: torch.dtype) -> Int8Embedding:
    embedding = Int8Embedding(vocab, hidden, dtype)
    embedding.quantize(torch.randn(vocab, hidden) * 3)
    if layout == "lanes":
        embedding.take_shared(embedding.qweight, packing.pack_w8_lanes(embedding.qweight), "lanes")
    return embedding


@pytest.mark.parametrize("layout", ["rows", "lanes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,hidden", [(37, 64), (16, 4), (50, 132)])
def test_kernel_rows_equal_the_pytorch_lookup(layout, dtype, vocab, hidden):
    embedding = embedding_in(layout, vocab, hidden, dtype)
    # Rows of whole 16-row blocks and of the short last one; a 2-d batch, a single id, repeats.
    for ids in (torch.tensor([[0, vocab - 1, 17 % vocab], [15, 16 % vocab, vocab - 1]]), torch.tensor([vocab // 2]),
                torch.randint(0, vocab, (40,))):
        rows = embedding(ids)
        assert rows.dtype == dtype and rows.shape == (*ids.shape, hidden)
        assert torch.equal(rows, embedding.reference_rows(ids))
    # Each row is its codes times its scale, whichever layout holds them.
    ids = torch.arange(vocab)
    expected = (embedding.stored_codes().float() * embedding.scales[:, None]).to(dtype)
    assert torch.equal(embedding(ids), expected)


def test_rows_of_an_odd_width_in_the_row_layout():
    embedding = embedding_in("rows", 21, 66, torch.bfloat16)
    ids = torch.tensor([3, 20, 0])
    assert torch.equal(embedding(ids), embedding.reference_rows(ids))


def test_int32_ids_and_no_ids():
    embedding = embedding_in("lanes", 37, 64, torch.bfloat16)
    ids = torch.tensor([[3, 36], [0, 20]])
    assert torch.equal(embedding(ids.int()), embedding.reference_rows(ids))
    empty = embedding(torch.empty(0, dtype=torch.long))
    assert empty.shape == (0, 64) and empty.dtype == torch.bfloat16


def test_an_id_outside_the_vocabulary_is_a_clear_error():
    embedding = embedding_in("lanes", 37, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="token id 37 outside the vocabulary of 37"):
        embedding(torch.tensor([1, 37]))
    with pytest.raises(RuntimeError, match="token id -1 outside"):
        embedding(torch.tensor([-1]))
