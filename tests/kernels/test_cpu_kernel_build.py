"""The first build of the CPU kernels takes a minute: it is announced before and after, and a
cached build is loaded silently. (The compiler is replaced here; the real build is exercised
by every test that runs a kernel.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fitserve.kernels import cpu


@pytest.fixture
def fitserve_log() -> list[str]:
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("fitserve")  # it does not propagate, so caplog cannot see it
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def fake_build(monkeypatch: pytest.MonkeyPatch, root: Path, log: list[str]) -> list[list[str]]:
    """Point the build cache at `root`; the fake compiler records what was logged before it ran."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setattr(cpu, "cpu_supports_kernels", lambda: True)
    seen_before: list[list[str]] = []

    def load(**kwargs):
        seen_before.append(list(log))
        return "module"

    monkeypatch.setattr(cpp_extension, "load", load)
    return seen_before


def test_first_build_is_announced_before_and_after(tmp_path, monkeypatch, fitserve_log) -> None:
    seen_before = fake_build(monkeypatch, tmp_path, fitserve_log)
    assert cpu._build() == "module"
    [before] = seen_before
    assert len(before) == 1 and "compiling them for this machine, once" in before[0]
    assert str(tmp_path / cpu.module_name(cpu._BUILD_FLAGS)) in before[0]
    assert fitserve_log[-1].startswith("CPU kernels: compiled in")


def test_cached_build_loads_silently(tmp_path, monkeypatch, fitserve_log) -> None:
    seen_before = fake_build(monkeypatch, tmp_path, fitserve_log)
    name = cpu.module_name(cpu._BUILD_FLAGS)
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"")
    assert cpu._build() == "module"
    assert seen_before == [[]] and fitserve_log == []
