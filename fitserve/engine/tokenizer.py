"""Tokenizer loading through transformers, so tokenization matches what users get elsewhere."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fitserve.models.config import ModelLoadError

logger = logging.getLogger("fitserve")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, required: bool = False):
    """The directory's tokenizer, or None when it has none (token-id-only checkpoints).

    Random-weight checkpoints used for speed work often ship without a tokenizer; they can
    still serve `prompt_token_ids` prompts, with empty text in the outputs.
    """
    path = Path(path)
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        if required:
            raise ModelLoadError(
                f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                "copy the tokenizer files of the original model into it or pass --tokenizer DIR"
            )
        logger.warning("no tokenizer in %s: only token-id prompts can be served", path)
        return None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types for broken files
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {error}") from error
