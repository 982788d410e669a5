"""Backend selection: names map to implementations, and bad requests fail with a reason."""

from __future__ import annotations

import pytest
import torch

from fitserve.attention import get_attention_backend
from fitserve.attention import torch_paged
from fitserve.config import ConfigError


def test_torch_and_cpu_auto_use_the_portable_path():
    assert get_attention_backend("torch", torch.device("cpu")) is torch_paged
    assert get_attention_backend("auto", torch.device("cpu")) is torch_paged


def test_triton_needs_cuda_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        get_attention_backend("triton", torch.device("cpu"))


def test_triton_runs_on_cpu_tensors_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_attention_backend("triton", torch.device("cpu")).__name__ == "fitserve.attention.triton_paged"


def test_unknown_backend_name():
    with pytest.raises(ConfigError, match="auto, torch, triton"):
        get_attention_backend("flash", torch.device("cpu"))
