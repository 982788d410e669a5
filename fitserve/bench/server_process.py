"""Starting and stopping a local fitserve server for `fitserve bench --model`."""

from __future__ import annotations

import importlib.util
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve_module() -> str:
    """`fitserve.cli` once the top-level CLI exists; the server's own CLI until then."""
    return "fitserve.cli" if importlib.util.find_spec("fitserve.cli") else "fitserve.server.cli"


class ServerProcess:
    """A `fitserve serve` subprocess on a free loopback port; its log goes to a file so a
    failed start can be explained with the server's own last words."""

    def __init__(self, model_dir: str | Path, log_path: Path, extra_args: str = "",
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.model_dir = str(model_dir)
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.command = [sys.executable, "-m", serve_module(), "serve", self.model_dir,
                        "--host", host, "--port", str(self.port), *shlex.split(extra_args)]
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout_s: float = 300.0) -> None:
        """Launch and wait until GET /health answers 200 (loading a model takes a while)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the fitserve server exited with code {self.process.returncode} "
                                   f"before it was ready; its log ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the fitserve server was not healthy after {timeout_s:g} s "
                           f"(raise --server-start-timeout?); its log ends:\n{self.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM for a clean shutdown, then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=grace_s)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
