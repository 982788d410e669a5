"""CPU weights are placed in transparent huge pages where the kernel offers them, without
changing what the model computes, and the memory goes back when the model is dropped."""

from __future__ import annotations

import gc
import re

import torch

from fitserve.config import default_model_dir
from fitserve.models import host_memory
from fitserve.models.loader import load_model

CPU = torch.device("cpu")


def mappings() -> list[tuple[int, int, int]]:
    """(start, end, AnonHugePages bytes) of every mapping of this process."""
    result, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            header = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if header:
                current = [int(header.group(1), 16), int(header.group(2), 16), 0]
                result.append(current)
            elif line.startswith("AnonHugePages:") and current is not None:
                current[2] = int(line.split()[1]) * 1024
    return [tuple(mapping) for mapping in result]


def huge_bytes_in(start: int, length: int) -> int:
    return sum(huge for low, high, huge in mappings() if low < start + length and high > start)


def is_mapped(address: int) -> bool:
    return any(low <= address < high for low, high, _ in mappings())


def test_mode_is_read_from_the_kernel_setting(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(host_memory, "_THP_SETTING", setting)
    assert host_memory.transparent_huge_pages_mode() == "madvise"
    assert host_memory.huge_pages_available()
    setting.write_text("always madvise [never]\n")
    assert not host_memory.huge_pages_available()
    assert host_memory.arena_views({"w": (4, 4)}, torch.float32) is None
    monkeypatch.setattr(host_memory, "_THP_SETTING", tmp_path / "missing")
    assert host_memory.transparent_huge_pages_mode() is None and not host_memory.huge_pages_available()


def test_arena_views_are_disjoint_aligned_and_writable():
    if not host_memory.huge_pages_available():
        assert host_memory.arena_views({"w": (4, 4)}, torch.float32) is None
        return
    shapes = {"a": (3, 5), "b": (7,), "c": (1024, 1024)}
    views = host_memory.arena_views(shapes, torch.bfloat16)
    assert views["a"].data_ptr() % host_memory.HUGE_PAGE_BYTES == 0
    spans = []
    for name, shape in shapes.items():
        view = views[name]
        assert view.shape == shape and view.dtype == torch.bfloat16 and view.is_contiguous()
        assert view.data_ptr() % 64 == 0
        view.fill_(len(spans) + 1)
        spans.append((view.data_ptr(), view.data_ptr() + view.numel() * view.element_size()))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    for index, name in enumerate(shapes):  # no write landed in another view
        assert torch.all(views[name] == index + 1)


def test_loaded_cpu_weights_sit_in_huge_pages_and_are_freed_with_the_model():
    model, _ = load_model(default_model_dir(), torch.float32, CPU, "torch")
    parameters = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in parameters)
    if not host_memory.huge_pages_available():
        assert len({p.untyped_storage().data_ptr() for p in parameters}) == len(parameters)
        return
    # One arena for all of them, and most of it (all but the unaligned tail) in 2 MiB pages.
    assert len({p.untyped_storage().data_ptr() for p in parameters}) == 1
    start = min(p.data_ptr() for p in parameters)
    assert huge_bytes_in(start, total) >= total - 2 * host_memory.HUGE_PAGE_BYTES
    del model, parameters
    gc.collect()
    assert not is_mapped(start)


def test_huge_pages_change_no_output():
    plain, config = load_model(default_model_dir(), torch.float32, CPU, "torch", huge_pages=False)
    arena, _ = load_model(default_model_dir(), torch.float32, CPU, "torch")
    assert len({p.untyped_storage().data_ptr() for p in plain.parameters()}) > 1
    for (name, a), (_, b) in zip(plain.named_parameters(), arena.named_parameters()):
        assert torch.equal(a, b), name
    if config.tie_word_embeddings:
        assert arena.lm_head.weight.data_ptr() == arena.model.embed_tokens.weight.data_ptr()


def test_a_refused_mapping_falls_back_to_ordinary_memory(monkeypatch):
    def refuse(num_bytes):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: True)
    monkeypatch.setattr(host_memory, "huge_page_buffer", refuse)
    assert host_memory.arena_views({"w": (4, 4)}, torch.float32) is None
    model, _ = load_model(default_model_dir(), torch.float32, CPU, "torch")
    parameters = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in parameters}) == len(parameters)
