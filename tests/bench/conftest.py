"""Fixtures: the scripted fake OpenAI server (scripted_server.py) in a subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import write_tiny_tokenizer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ScriptedServerHandle:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def stats(self) -> dict:
        return httpx.get(f"{self.base_url}/stats", timeout=10).json()


@pytest.fixture
def scripted_server(scripted_server_process):
    """(base_url, handle) of the scripted server, its records cleared for this test."""
    base_url, handle = scripted_server_process
    httpx.post(f"{base_url}/reset", timeout=10).raise_for_status()
    return base_url, handle


@pytest.fixture(scope="module")
def scripted_server_process():
    """One scripted server process per test module (starting Python costs seconds here)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("scripted_server.py")), str(port)])
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the scripted server did not start")
            time.sleep(0.05)
        yield base_url, ScriptedServerHandle(base_url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


_CORPUS = [
    "Serving many users at once needs continuous batching over a paged cache.",
    "The benchmark measures time to first token, time per output token and throughput.",
    "A small model on a laptop can still answer questions quickly and cheaply.",
    "hello world the a of and to in is it that for on with as at by from",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a trained byte-level BPE tokenizer: real files, fast to serve."""
    from fitserve.models.random_checkpoint import write_random_checkpoint

    out_dir = tmp_path_factory.mktemp("bench-tiny-model")
    write_random_checkpoint(out_dir, "llama-3.2-1b", dtype="float32", seed=0, init_std=0.1, overrides={
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 384, "max_position_embeddings": 512,
        "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2})
    write_tiny_tokenizer(out_dir, vocab_size=384, corpus=_CORPUS)
    return out_dir
