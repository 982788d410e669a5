"""Calibration text for `fitserve quantize`: a user's file, or text every Python install has.

MixLLM's salience needs loss gradients on text like the model's inputs. A user passes
`--calibration-data FILE` (plain text, or JSONL with a "text" field per line). Without it,
the default is the Python standard library's source files of the running interpreter, which
exist on any machine that runs fitserve; for a model whose `training.json` lists the files
it was trained on and the files it was held out from (the bundled model), only its training
files are used, so its held-out perplexity stays an honest measure of the quantized model.
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CALIBRATION_SEQUENCE_TOKENS = 512
"""Tokens per calibration sample (the bundled model's training and evaluation window)."""
MIN_CALIBRATION_TOKENS = 256


class CalibrationError(ValueError):
    """Calibration text that cannot be used; the message says what to pass instead."""


@dataclass
class CalibrationText:
    text: str
    source: str
    """What the text is, for the summary and quantization_config."""


def read_calibration_file(path: Path) -> CalibrationText:
    """Plain text, or JSONL whose lines are objects with a "text" string (.jsonl / .json lines)."""
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CalibrationError(f"{path}:{number} is not a JSON line ({error}); use one object with a "
                                       "'text' field per line, or a plain-text file") from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f"{path}:{number} has no 'text' string")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise CalibrationError(f"calibration file {path} is empty; pass a file with representative text")
    return CalibrationText(raw, str(path))


def default_calibration_text(model_dir: Path, max_chars: int = 4_000_000) -> CalibrationText:
    """The interpreter's standard-library sources (the model's training files only, when its
    training.json names them), in a fixed shuffled order, up to `max_chars` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    training = model_dir / "training.json"
    heldout: set[str] = set()
    if training.is_file():
        corpus = json.loads(training.read_text(encoding="utf-8")).get("corpus", {})
        files = [stdlib / name for name in corpus.get("train_files", [])]
        heldout = set(corpus.get("heldout_files", []))
        source = f"Python {sysconfig.get_python_version()} standard library: the model's training files"
    else:
        files = sorted(stdlib.glob("*.py"))
        source = f"Python {sysconfig.get_python_version()} standard library (*.py at the top level)"
    files = [path for path in files if path.is_file() and str(path.relative_to(stdlib)) not in heldout]
    random.Random(0).shuffle(files)
    pieces, size = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces.append(text)
        size += len(text)
        if size >= max_chars:
            break
    if not pieces:
        raise CalibrationError(f"no standard-library sources found under {stdlib}; pass --calibration-data FILE")
    return CalibrationText("\n\n".join(pieces), source)


def calibration_samples(token_ids: list[int], num_tokens: int, sequence_tokens: int = CALIBRATION_SEQUENCE_TOKENS,
                        seed: int = 0) -> list[list[int]]:
    """About `num_tokens` tokens as windows of `sequence_tokens`, drawn without overlap from
    random places of the text (fewer if the text is short)."""
    if len(token_ids) < MIN_CALIBRATION_TOKENS:
        raise CalibrationError(f"calibration text has {len(token_ids)} tokens; at least {MIN_CALIBRATION_TOKENS} "
                               "are needed (a few thousand give stable choices)")
    sequence_tokens = min(sequence_tokens, len(token_ids))
    starts = list(range(0, len(token_ids) - sequence_tokens + 1, sequence_tokens))
    random.Random(seed).shuffle(starts)
    count = max(1, min(len(starts), num_tokens // sequence_tokens))
    return [token_ids[start:start + sequence_tokens] for start in sorted(starts[:count])]
