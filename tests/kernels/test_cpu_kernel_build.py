"""The first build of the CPU kernels takes a minute: it is announced before and after, a
cached build is loaded silently (without the compiler, wherever its sources sat), and an engine
on the CPU builds them while it is constructed.
(The compiler is replaced here; the real build is exercised by every test that runs a kernel.)"""

from __future__ import annotations

import logging
import shutil
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


def test_an_engine_on_the_cpu_builds_them_before_it_serves(tmp_path, monkeypatch, fitserve_log) -> None:
    """A server says it is listening once its engine exists. Built on first use, the kernels of
    a dense model would be compiled inside the first request instead, a minute on a fresh
    machine while that request (and any other) waits."""
    from fitserve.config import EngineArgs
    from fitserve.engine.engine import LLMEngine
    from tests.tiny_models import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(tmp_path / "model", "llama2")
    seen_before = fake_build(monkeypatch, tmp_path / "cache", fitserve_log)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen_before.append(list(fitserve_log)))  # no module
    monkeypatch.setattr(cpu, "_state", {})  # as in a fresh process (the loaded module stays for later tests)
    LLMEngine(EngineArgs(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory="4MiB"))
    assert len(seen_before) == 1 and "compiling them for this machine, once" in seen_before[0][-1]


@pytest.mark.skipif(cpu.get() is None, reason="CPU kernels unavailable (no AVX2 or no compiler)")
def test_a_cached_build_is_imported_without_the_compiler(tmp_path, monkeypatch, fitserve_log) -> None:
    """torch's loader recompiles a cached build whose sources sat at another path (a second
    checkout or environment on the same machine); the cache's name is the digest of the
    sources, flags and torch version, so a build under it is imported as it is."""
    built = cpu.get()
    name = cpu.module_name(cpu._BUILD_FLAGS)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / name).mkdir()
    shutil.copy(built.__file__, tmp_path / name / f"{name}.so")

    def compiler(**kwargs):
        raise AssertionError("the cached build was compiled again")

    monkeypatch.setattr(cpp_extension, "load", compiler)
    module = cpu._build()
    assert module is not None and Path(module.__spec__.origin).parent == tmp_path / name
    assert hasattr(module, "QuantLinear") and fitserve_log == []
