"""The corpus behind the bundled model: the Python standard library's own source.

Why the stdlib: it is on every machine that runs fitserve, so anyone can rebuild the exact
training data without a download, and code makes greedy continuations easy to judge by eye.
The stdlib differs between Python versions, so the version is recorded next to the model.

Selection rule (applied to the sorted list of every ``*.py`` under
``sysconfig.get_paths()["stdlib"]``): drop files inside any directory named in
``EXCLUDED_DIRECTORY_NAMES`` (test suites, GUI/IDE code, the deprecated 2to3 tool, generated
data tables, third-party packages, byte-code caches) and the ``config-*`` build directory.
Held-out split: the files whose index in the sorted selection is a multiple of
``HELDOUT_EVERY``; every other file is training data.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRECTORY_NAMES = frozenset({
    "test", "tests",                          # test suites: repetitive, huge, odd encodings
    "idlelib", "tkinter", "turtledemo",       # GUI code
    "lib2to3",                                # deprecated tool with Python 2 grammar fixtures
    "encodings", "pydoc_data",                # generated codec tables / a docs blob
    "site-packages", "__pycache__",           # not the stdlib itself
})
HELDOUT_EVERY = 20
HELDOUT_MAX_BYTES = 300_000
# A comment line between files keeps heldout.txt valid-looking Python and says where each
# file starts, without adding any token the model never saw in training.
FILE_HEADER = "# ---- file: {relative_path} ----\n"


@dataclass(frozen=True)
class CorpusSplit:
    """Relative paths (posix) of the training and held-out files, plus where they live."""

    stdlib_root: Path
    train_files: list[str]
    heldout_files: list[str]

    def read(self, relative_path: str) -> str:
        return (self.stdlib_root / relative_path).read_text(encoding="utf-8")


def python_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


def select_stdlib_files(stdlib_root: Path) -> list[str]:
    """The sorted posix relative paths of the stdlib files the corpus uses."""
    selected = []
    for path in stdlib_root.rglob("*.py"):
        relative = path.relative_to(stdlib_root)
        directories = relative.parts[:-1]
        if EXCLUDED_DIRECTORY_NAMES & set(directories):
            continue
        if directories and directories[0].startswith("config-"):
            continue
        selected.append(relative.as_posix())
    return sorted(selected)


def split_corpus(stdlib_root: Path | None = None) -> CorpusSplit:
    root = Path(stdlib_root or sysconfig.get_paths()["stdlib"])
    files = select_stdlib_files(root)
    heldout = [name for index, name in enumerate(files) if index % HELDOUT_EVERY == 0]
    train = [name for index, name in enumerate(files) if index % HELDOUT_EVERY != 0]
    return CorpusSplit(stdlib_root=root, train_files=train, heldout_files=heldout)


def heldout_text(split: CorpusSplit, max_bytes: int = HELDOUT_MAX_BYTES) -> str:
    """The held-out files, each behind a header comment, cut at the last full line that fits.

    Cutting on a line boundary keeps the truncation deterministic and the text readable.
    """
    pieces = [FILE_HEADER.format(relative_path=name) + split.read(name) for name in split.heldout_files]
    encoded = "".join(pieces).encode("utf-8")
    if len(encoded) <= max_bytes:
        return encoded.decode("utf-8")
    cut = encoded.rfind(b"\n", 0, max_bytes) + 1
    return encoded[:cut].decode("utf-8")
