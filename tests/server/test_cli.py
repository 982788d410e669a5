"""`fitserve serve` as a user runs it: a subprocess that prints where it listens and stops
cleanly on SIGTERM, also with a stream in flight."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


def start_server(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str, list[str]]:
    command = [
        sys.executable, "-m", "fitserve.server.cli", "serve", str(model_dir), "--port", "0",
        "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "4MiB", "--uvicorn-log-level", "warning", *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
    banner: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner.append(line.rstrip("\n"))
        if line.startswith("  API key"):
            break
    match = next((re.search(r"listening on (http://\S+)", line) for line in banner if "listening on" in line), None)
    assert match, "\n".join(banner)
    url = match.group(1)
    while time.monotonic() < deadline:  # the banner comes just before uvicorn starts accepting
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return process, url, banner


def test_serve_prints_banner_answers_and_stops_on_sigterm_mid_stream(tiny_model_dir: Path) -> None:
    # --shutdown-timeout 0: SIGTERM right after the first chunks leaves both choices running.
    process, url, banner = start_server(tiny_model_dir, "--served-model-name", "tiny", "--api-key", "k",
                                        "--shutdown-timeout", "0")
    try:
        text = "\n".join(banner)
        assert "dtype   float32" in text and "device cpu" in text
        assert re.search(r"KV cache \d+ tokens \(\d+ blocks x 16\)", text)
        assert "tiny" in text

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
        assert [model.id for model in client.models.list().data] == ["tiny"]
        reply = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1

        # Streams still running when the grace period is over are aborted, not cut: each
        # choice ends with finish_reason "abort" and the stream with [DONE].
        body = {"model": "tiny", "prompt": "story", "max_tokens": 240, "n": 2, "temperature": 0, "stream": True,
                "ignore_eos": True}
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k"},
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 2:
                        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert events[-1] == "[DONE]"
    finish_reasons = {}
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            if choice["finish_reason"] is not None:
                finish_reasons[choice["index"]] = choice["finish_reason"]
    assert finish_reasons == {0: "abort", 1: "abort"}
    assert process.returncode == 0, output
    assert "fitserve serve: stopped" in output
    assert "Traceback" not in output and "aborting them" in output


def test_serve_reports_a_bad_model_dir_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fitserve.server.cli", "serve", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "fitserve serve: error:" in result.stderr
    assert "Traceback" not in result.stderr


def run_serve_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitserve.server.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)


def test_serve_refuses_a_port_out_of_range_before_anything_else(tmp_path: Path) -> None:
    # The OS would wrap 99999 into another port; argparse refuses it, naming the flag.
    result = run_serve_command(str(tmp_path / "missing"), "--port", "99999")
    assert result.returncode == 2
    assert "--port: must be from 0 to 65535 (got 99999)" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_checks_the_host_before_loading_the_model(tmp_path: Path) -> None:
    # The model directory is missing too: the host is the first thing checked, in one line.
    result = run_serve_command(str(tmp_path / "missing"), "--host", "no-such-host.invalid", "--port", "0")
    assert result.returncode == 1
    assert "cannot listen on no-such-host.invalid:0" in result.stderr
    assert "loading" not in result.stdout and "Traceback" not in result.stderr

