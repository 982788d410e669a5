"""The copies behind swap preemption: device <-> host KV, one copy per group of blocks.

The scheduler decides which blocks move (`SchedulerOutput.swap_out` / `swap_in`, in groups of
consecutive blocks); this object owns the host-memory KV tensor and makes the copies:

- swap-out copies are made before the step runs (the step may write into the blocks just
  released), in the engine's thread;
- swap-in copies run in a worker thread (on a CUDA device, on their own stream) while the
  engine keeps stepping the other requests; `completed()` tells the engine whose copies are
  done, and only then does the scheduler let those requests run.

Each group moves every layer's K and V with one tensor copy when the per-layer caches are
float views of one allocation (as `allocate_kv_cache` makes them), else with one copy per
tensor of each layer (an int8 cache's K, V and their scales).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fitserve.attention.cache_layout import LayerKVCache
from fitserve.engine.kv_cache import CopyGroup


def layer_tensors(cache: LayerKVCache | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The tensors of one layer's cache that hold per-block data: K and V, plus their scales
    for an int8 cache."""
    cache = LayerKVCache(*cache)
    return [cache.key, cache.value, *([cache.key_scales, cache.value_scales] if cache.is_int8 else [])]


def stacked_view(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """All layers' (key, value) caches as one (layers, 2, blocks, ...) view of their common
    storage, or None when they are not evenly spaced views of one allocation."""
    first_key, first_value = kv_caches[0]
    element = first_key.element_size()
    kv_stride = (first_value.data_ptr() - first_key.data_ptr()) // element
    layer_stride = ((kv_caches[1][0].data_ptr() - first_key.data_ptr()) // element if len(kv_caches) > 1
                    else 2 * kv_stride)
    for layer, (key, value) in enumerate(kv_caches):
        if (key.shape != first_key.shape or key.stride() != first_key.stride() or not key.is_contiguous()
                or key.data_ptr() != first_key.data_ptr() + layer * layer_stride * element
                or value.data_ptr() != key.data_ptr() + kv_stride * element):
            return None
    return torch.as_strided(first_key, (len(kv_caches), 2, *first_key.shape),
                            (layer_stride, kv_stride, *first_key.stride()))


class SwapSpace:
    """Host KV blocks (pinned on CUDA) shaped like the device cache's blocks, and the copies."""

    def __init__(self, kv_caches: list[LayerKVCache], num_host_blocks: int) -> None:
        self.layers = [layer_tensors(cache) for cache in kv_caches]
        key = self.layers[0][0]
        self.device = key.device
        pin = self.device.type == "cuda"
        self.device_view = stacked_view([(k, v) for k, v, *_ in self.layers]) if len(self.layers[0]) == 2 else None
        if self.device_view is not None:
            self.host = torch.zeros((len(self.layers), 2, num_host_blocks, *key.shape[1:]), dtype=key.dtype,
                                    pin_memory=pin)
            self.host_layers: list[list[torch.Tensor]] = []
        else:  # one host tensor per device tensor, blocks first like the cache
            self.host_layers = [[torch.zeros((num_host_blocks, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                                 for t in tensors] for tensors in self.layers]
        self.bytes_per_block = sum(t[0].numel() * t.element_size() for t in self.layers[0]) * len(self.layers)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fitserve-swap")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.num_copies = 0
        """Tensor copies made (one per group when the cache is one allocation)."""
        self.num_bytes_out = 0
        self.num_bytes_in = 0

    def swap_out(self, groups: list[CopyGroup]) -> None:
        """Device -> host, done when this returns."""
        self._copy(groups, to_host=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def start_swap_in(self, request_id: str, groups: list[CopyGroup]) -> None:
        """Host -> device in the worker thread; `completed()` reports it once done."""
        self._pending[request_id] = self._worker.submit(self._swap_in, groups)

    def _swap_in(self, groups: list[CopyGroup]) -> None:
        if self._stream is None:
            self._copy(groups, to_host=False)
            return
        with torch.cuda.stream(self._stream):
            self._copy(groups, to_host=False)
        self._stream.synchronize()

    def completed(self) -> list[str]:
        """Requests whose swap-in finished since the last call (a failed copy raises here)."""
        done = [request_id for request_id, future in self._pending.items() if future.done()]
        for request_id in done:
            self._pending.pop(request_id).result()
        return done

    def has_pending(self) -> bool:
        return bool(self._pending)

    def wait_any(self) -> None:
        """Block until some pending swap-in is done (the engine has nothing else to run)."""
        if self._pending:
            next(iter(self._pending.values())).result()

    def wait(self, request_id: str) -> None:
        """Block until this request's swap-in (if any) is done, e.g. before freeing its blocks."""
        future = self._pending.pop(request_id, None)
        if future is not None:
            future.result()

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)

    def _copy(self, groups: list[CopyGroup], to_host: bool) -> None:
        for source, destination, count in groups:
            if self.device_view is not None:
                self._copy_one(self.device_view, self.host, source, destination, count, to_host)
                num_copies = 1
            else:
                num_copies = sum(len(tensors) for tensors in self.layers)
                for tensors, host_tensors in zip(self.layers, self.host_layers, strict=True):
                    for device_tensor, host_tensor in zip(tensors, host_tensors, strict=True):
                        self._copy_one(device_tensor, host_tensor, source, destination, count, to_host,
                                       block_dim=0)
            moved = count * self.bytes_per_block
            with self._lock:
                self.num_copies += num_copies
                if to_host:
                    self.num_bytes_out += moved
                else:
                    self.num_bytes_in += moved

    @staticmethod
    def _copy_one(device: torch.Tensor, host: torch.Tensor, source: int, destination: int, count: int,
                  to_host: bool, block_dim: int = 2) -> None:
        if to_host:
            host.narrow(block_dim, destination, count).copy_(device.narrow(block_dim, source, count),
                                                             non_blocking=True)
        else:
            device.narrow(block_dim, destination, count).copy_(host.narrow(block_dim, source, count),
                                                               non_blocking=True)
