"""What the report says about where it ran: hardware and software versions."""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import platform
import socket
import subprocess
from pathlib import Path
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


def gpu_driver_version() -> str | None:
    """The NVIDIA driver's version (NVML, else nvidia-smi), or None without one."""
    try:
        import pynvml  # nvidia-ml-py; optional

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no library, no driver: try the command line tool
        pass
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else None


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
        "gpu_driver": gpu_driver_version() if gpu_names else None,
        "triton": _version("triton"),
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


def _listening_socket_inodes(port: int, proc_root: Path) -> set[str]:
    """Inodes of TCP sockets listening on `port`, from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc_root / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def pid_listening_on(url: str, proc_root: Path = Path("/proc")) -> int | None:
    """The process listening on the URL's port, if this machine lets us see it.

    Reads /proc directly and stops at the first process holding the socket: psutil's
    net_connections lists every connection of every process first (seconds on a busy host).
    """
    port = urlparse(url).port or (443 if url.startswith("https") else 80)
    if not (proc_root / "net").is_dir():  # no procfs (macOS): psutil's slower portable scan
        try:
            for connection in psutil.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
                    return connection.pid
        except (psutil.Error, PermissionError):
            return None
        return None
    inodes = _listening_socket_inodes(port, proc_root)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for process_dir in proc_root.iterdir():
        if not process_dir.name.isdigit():
            continue
        try:
            for descriptor in (process_dir / "fd").iterdir():
                if os.readlink(descriptor) in targets:
                    return int(process_dir.name)
        except OSError:  # exited meanwhile, or not ours to inspect
            continue
    return None
