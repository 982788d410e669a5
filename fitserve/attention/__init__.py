"""Paged attention backends and how to pick one.

A backend is anything with the two functions of `fitserve.attention.torch_paged`: a module
satisfies the protocol as well as an object does. The model receives its backend at
construction, so two models in one process can use different backends (no global switch).
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol, cast

import torch

from fitserve.attention.metadata import AttentionMetadata
from fitserve.attention.triton_common import is_interpreting
from fitserve.config import ConfigError


class AttentionBackend(Protocol):
    """Writes a step's new K/V into the paged cache and attends over each sequence's context."""

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        key_scales: torch.Tensor | None = None,
        value_scales: torch.Tensor | None = None,
    ) -> None:
        """The scales are given for an int8 cache (fitserve.attention.cache_layout): the
        backend quantizes K/V per token and head as it stores them."""

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        key_scales: torch.Tensor | None = None,
        value_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reads an int8 cache as it is stored, with its scales (no dequantized copy)."""


BACKEND_NAMES = ("auto", "torch", "triton")


def _torch_backend() -> AttentionBackend:
    from fitserve.attention import torch_paged

    return cast(AttentionBackend, torch_paged)


def _triton_backend() -> ModuleType:
    # Imported lazily: triton is an optional dependency and slow to import.
    from fitserve.attention import triton_paged

    return triton_paged


def is_triton_backend(backend: AttentionBackend) -> bool:
    """True for the Triton kernels, whose launches need no host data and so can be captured
    in CUDA graphs (the torch path sizes tensors from host-side lengths)."""
    return getattr(backend, "__name__", "") == "fitserve.attention.triton_paged"


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """"torch": portable path; "triton": GPU kernels; "auto": triton on CUDA when it imports."""
    if name == "torch":
        return _torch_backend()
    if name == "triton":
        # Triton's CPU interpreter runs the kernels on CPU tensors: slow, but it lets the tests
        # run the whole GPU path (kernels, fused ops, static decode buffers) without a GPU.
        if device.type != "cuda" and not is_interpreting():
            raise ConfigError(
                f"attention backend 'triton' needs a CUDA device (got {device}); use 'torch' or 'auto'"
            )
        try:
            return cast(AttentionBackend, _triton_backend())
        except ImportError as error:
            raise ConfigError(
                f"attention backend 'triton' needs the triton package ({error}); "
                "install it with `pip install -e .[cuda]` or use --attention-backend torch"
            ) from error
    if name == "auto":
        if device.type == "cuda":
            try:
                return cast(AttentionBackend, _triton_backend())
            except ImportError:
                pass
        return _torch_backend()
    raise ConfigError(f"unknown attention backend {name!r}: use {', '.join(BACKEND_NAMES)}")
