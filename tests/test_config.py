"""Engine settings validated at the edge: sizes, dtypes, and clear errors for bad values."""

from __future__ import annotations

import pytest
import torch

from fitserve.config import ConfigError, EngineArgs, parse_size, resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("text", "size"), [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                            ("1000", 1000), (4096, 4096)])
def test_memory_sizes_parse(text, size) -> None:
    assert parse_size(text) == size


def test_unreadable_size_says_what_to_write() -> None:
    with pytest.raises(ConfigError, match="e.g. 2GiB"):
        parse_size("two gigs")


def test_auto_dtype_follows_the_checkpoint_except_where_it_would_be_slow() -> None:
    assert resolve_dtype("auto", torch.float32, CPU) == torch.float32
    assert resolve_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert resolve_dtype("auto", torch.float16, CPU) == torch.bfloat16
    # GPUs run float32 checkpoints in bfloat16 by default; half precision stays as stored.
    assert resolve_dtype("auto", torch.float32, CUDA) == torch.bfloat16
    assert resolve_dtype("auto", torch.float16, CUDA) == torch.float16
    # An explicit choice is always honoured.
    assert resolve_dtype("float32", torch.bfloat16, CUDA) == torch.float32
    with pytest.raises(ConfigError, match="use auto, float32, bfloat16 or float16"):
        resolve_dtype("float8", torch.float32, CPU)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("block_size", 12, "power of two"),
    ("max_num_batched_tokens", 0, "max_num_batched_tokens must be >= 1"),
    ("max_num_seqs", 0, "max_num_seqs must be >= 1"),
    ("gpu_memory_utilization", 1.5, r"in \(0, 1\]"),
    ("kv_cache_memory", "lots", "cannot read memory size"),
    ("attention_backend", "flash", "torch or triton"),
])
def test_bad_engine_settings_name_the_field(field, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineArgs(**{field: value})
