"""What the report says about where it ran: hardware and software versions."""

from __future__ import annotations

import importlib.metadata
import ipaddress
import platform
import socket
from urllib.parse import urlparse

import psutil


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(gpu_names: list[str] | None) -> dict:
    import torch

    return {
        "host": socket.gethostname(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpu_names or "none seen by NVML",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "httpx": _version("httpx"),
        "fitserve": _version("fitserve"),
    }


def is_local_url(url: str) -> bool:
    """Whether the server runs on this machine (so its process and counters can be sampled)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pid_listening_on(url: str) -> int | None:
    """The process listening on the URL's port, if this machine lets us see it."""
    port = urlparse(url).port or (443 if url.startswith("https") else 80)
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
                return connection.pid
    except (psutil.Error, PermissionError):
        return None
    return None
