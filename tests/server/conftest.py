"""A real fitserve server on a loopback port, backed by a tiny random Llama with a real tokenizer.

The model is random (its text is gibberish) but everything around it is real: a byte-level
BPE tokenizer with a chat template saved next to the checkpoint, the real engine, uvicorn,
and the official `openai` client. The server runs in a thread of the test process so that
tests can also look at the engine's KV-cache accounting directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from fitserve.config import EngineArgs
from fitserve.engine.async_engine import AsyncLLMEngine
from fitserve.engine.engine import EngineStats, LLMEngine
from fitserve.llm import LLM
from fitserve.models.random_checkpoint import write_random_checkpoint
from fitserve.server.app import build_app
from fitserve.server.serving_common import ServerSettings
from tests.tiny_models import write_tiny_tokenizer

API_KEY = "test-key"
MODEL_NAME = "tiny-chat"
KV_CACHE_MEMORY = "4MiB"

TINY_LLAMA = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 256,
    "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2,
}

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("tiny-chat-model")
    write_random_checkpoint(out_dir, "llama-3.2-1b", dtype="float32", seed=0, init_std=0.1, overrides=TINY_LLAMA)
    write_tiny_tokenizer(out_dir, TINY_LLAMA["vocab_size"])
    return out_dir


def engine_args_for(model_dir: Path) -> EngineArgs:
    return EngineArgs(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory=KV_CACHE_MEMORY)


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir: Path) -> LLM:
    """The offline API on the same checkpoint: what the server's greedy outputs must equal."""
    return LLM(str(tiny_model_dir), dtype="float32", device="cpu", kv_cache_memory=KV_CACHE_MEMORY)


def free_loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


@dataclass
class RunningServer:
    """A live server: its URL plus a window onto the engine behind it."""

    base_url: str
    async_engine: AsyncLLMEngine

    def stats(self) -> EngineStats:
        stats = self.async_engine.get_stats()
        assert stats is not None
        return stats

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample of GET /metrics (0 when it has not appeared yet)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                    return sample.value
        return 0.0

    def wait_until_idle(self, timeout: float = 60.0) -> EngineStats:
        """Block until no request is running or waiting (aborts land one engine step later)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
                return stats
            if time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


@contextlib.contextmanager
def serve_in_thread(model_dir: Path, engine_args: EngineArgs | None = None,
                    **settings: object) -> Iterator[RunningServer]:
    """A server for `model_dir` in a background thread, API key required; `settings` override
    the `ServerSettings` defaults of the shared server."""
    engine = LLMEngine(engine_args or engine_args_for(model_dir))
    async_engine = AsyncLLMEngine(engine)
    options = {"served_model_names": [MODEL_NAME], "api_key": API_KEY, "model_path": str(model_dir),
               "max_request_body_bytes": 64 * 1024}
    app = build_app(async_engine, ServerSettings(**(options | settings)))
    sock = free_loopback_socket()
    port = sock.getsockname()[1]
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", async_engine)
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    """One server for the whole session, in a background thread, API key required."""
    with serve_in_thread(tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def make_async_client(server: RunningServer) -> Callable[[], openai.AsyncOpenAI]:
    """Async clients bind to the event loop they are used in, so each test makes its own."""

    def make(**kwargs) -> openai.AsyncOpenAI:
        options = {"base_url": f"{server.base_url}/v1", "api_key": API_KEY, "max_retries": 0, "timeout": 120}
        return openai.AsyncOpenAI(**(options | kwargs))

    return make


def run_async(coroutine):
    """Run a coroutine to completion from a sync test (no pytest-asyncio needed)."""
    return asyncio.run(coroutine)
