"""Generated token ids -> text, one step at a time, with stop-string detection.

Decoding the whole output again at every step would cost O(output length) per token, and
decoding each token on its own is wrong: byte-level BPE splits multi-byte characters across
tokens, and SentencePiece-style decoders drop the "▁" space of whichever token comes first.
The classic fix (used by vLLM and TGI) decodes a short window twice: the last emitted chunk
of tokens (the "prefix" window) and that chunk plus the tokens not yet emitted. Both decodes
start at the same token, so whatever the decoder does to a sequence's first token happens to
both, and the difference between them is exactly the new text. While the result ends in
U+FFFD the new tokens may still be in the middle of a character, so nothing is emitted until
a later token completes it.

Only output ids are decoded (the prompt is not context for the text): the final text must
equal `tokenizer.decode(output_ids)` exactly, including whether the first token's space is
stripped.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from fitserve.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN_NAMES = [f"<0x{byte:02X}>" for byte in range(256)]


@dataclass(frozen=True)
class _TokenizerFacts:
    """What the detokenizer needs to know about a tokenizer, looked up once per tokenizer."""

    byte_token_ids: frozenset[int]
    """SentencePiece byte-fallback tokens ("<0xE5>" ...); empty for other tokenizers.

    A ByteFallback decoder turns a whole run of byte tokens into U+FFFD, one per token, as
    soon as the run is not valid UTF-8, so a later byte can change the text of earlier ones:
    a run's text is final only once a non-byte token follows it."""
    special_token_ids: frozenset[int]
    """Tokens that skip_special_tokens leaves out; they do not end a byte run."""
    backend: Any | None
    """The Rust `tokenizers.Tokenizer` when decoding through it gives exactly what
    `tokenizer.decode` gives (about 4x faster than going through transformers), else None."""
    anchor_token_ids: list[int]
    """A plain token ("a") to decode log-prob tokens after; see `decode_token`."""
    token_texts: dict[int, str] = field(default_factory=dict)
    """decode_token results, shared by every request: a token's text never changes."""


def _equivalent_backend(tokenizer: Any) -> Any | None:
    """The backend tokenizer if transformers' decode is only a wrapper around it.

    That holds when neither `decode` nor `_decode` is overridden below transformers' own
    fast-tokenizer classes (their `_decode` calls the backend, then an optional space cleanup
    that the detokenizer turns off anyway).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode"):
        return None

    def defining_class(name: str) -> str | None:
        owner = next((cls for cls in type(tokenizer).__mro__ if name in cls.__dict__), None)
        return owner.__name__ if owner is not None else None

    if defining_class("_decode") not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return None
    if defining_class("decode") != "PreTrainedTokenizerBase":
        return None
    return backend


_facts_by_tokenizer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_facts(tokenizer: Any) -> _TokenizerFacts:
    try:
        return _facts_by_tokenizer[tokenizer]
    except (KeyError, TypeError):
        pass
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer.convert_tokens_to_ids(_BYTE_TOKEN_NAMES)
    byte_token_ids = frozenset(
        token_id for token_id in ids if token_id is not None and token_id != unknown_id
    )
    special_token_ids = set(getattr(tokenizer, "all_special_ids", []))
    for token_id, added_token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added_token, "special", False):
            special_token_ids.add(token_id)
    try:
        anchor_token_ids = list(tokenizer.encode("a", add_special_tokens=False))
    except Exception:  # a tokenizer that cannot encode still decodes single tokens
        anchor_token_ids = []
    facts = _TokenizerFacts(
        byte_token_ids,
        frozenset(special_token_ids),
        _equivalent_backend(tokenizer),
        anchor_token_ids,
    )
    try:
        _facts_by_tokenizer[tokenizer] = facts
    except TypeError:  # not weak-referenceable: recompute next time, it is a few hundred lookups
        pass
    return facts


class IncrementalDetokenizer:
    """Streams one request's output text and finds its stop strings.

    `output_text` only ever grows (each value is a prefix of every later one): it never ends in
    a half-decoded character and holds back a tail that could still turn into a stop string.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        # prompt_token_ids is accepted for API symmetry with vLLM; see the module docstring.
        del prompt_token_ids
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop_strings: list[str] = list(params.stop or [])
        self._longest_stop = max((len(stop) for stop in self.stop_strings), default=0)

        self._facts = _tokenizer_facts(tokenizer)
        self.token_ids: list[int] = []
        # Tokens [prefix_offset, read_offset) are the last chunk already turned into text;
        # tokens from read_offset on wait until their text can no longer change.
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._num_held_back_chars = 0
        self.stop_string_matched: str | None = None

    @property
    def output_text(self) -> str:
        """Text safe to show now (see the class docstring)."""
        if self._num_held_back_chars:
            return self._text[: len(self._text) - self._num_held_back_chars]
        return self._text

    @property
    def finished(self) -> bool:
        """A stop string matched; later tokens are ignored."""
        return self.stop_string_matched is not None

    def append(self, new_token_ids: list[int]) -> str | None:
        """Add generated tokens; return the stop string that matched, else None.

        On a match the text is cut before the stop string (after it with
        include_stop_str_in_output) and nothing more is ever added.
        """
        if self.finished:
            return self.stop_string_matched
        self.token_ids.extend(new_token_ids)
        return self._emit_pending(final=False)

    def finish(self) -> str:
        """The request ended for another reason (EOS, stop token, length): release everything.

        Tokens still waiting for a complete character are decoded as they are (the result then
        holds U+FFFD, exactly like a full decode would) and the held-back tail is released.
        """
        if not self.finished:
            self._emit_pending(final=True)
        self._num_held_back_chars = 0
        return self._text

    def decode_token(self, token_id: int) -> str:
        """One token's own text, with its leading space, for log-prob entries.

        Decoded after a fixed anchor token so that decoders which strip the first token's "▁"
        space do not strip it here; special tokens keep their text.
        """
        token_texts = self._facts.token_texts
        text = token_texts.get(token_id)
        if text is None:
            anchor = self._facts.anchor_token_ids
            anchor_text = self._decode(anchor, skip_special_tokens=False) if anchor else ""
            with_token = self._decode(anchor + [token_id], skip_special_tokens=False)
            text = token_texts[token_id] = with_token[len(anchor_text) :]
        return text

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if self._facts.backend is not None:
            return self._facts.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        # Cleanup of tokenization spaces rewrites text across token boundaries, so it cannot be
        # streamed; transformers ignores it for BPE (every Llama-family tokenizer) anyway.
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _emit_pending(self, final: bool) -> str | None:
        """Turn tokens from read_offset on into text once that text can no longer change.

        Text that may still change (it ends in U+FFFD, or inside a byte-fallback run) is held,
        except when it completes a stop string: the request then ends here, so this text is
        the final decode and nothing can change it any more.
        """
        if self._read_offset == len(self.token_ids):
            return None
        may_change = not final and self._ends_inside_byte_run()
        if may_change and not self.stop_strings:
            return None  # spare the decodes: nothing could be done with the text
        prefix_text = self._decode(
            self.token_ids[self._prefix_offset : self._read_offset], self.skip_special_tokens
        )
        window_text = self._decode(self.token_ids[self._prefix_offset :], self.skip_special_tokens)
        # Empty new text (e.g. a skipped special token) must not move the window: the next
        # window would then start at a token with no text, and a decoder that strips the first
        # token's space would strip the wrong one.
        if len(window_text) <= len(prefix_text):
            return None
        new_text = window_text[len(prefix_text) :]
        may_change = may_change or (not final and new_text.endswith(_REPLACEMENT_CHAR))
        match = self._find_stop(new_text)
        if may_change and match is None:
            return None
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self._text += new_text
        if match is not None:
            cut, self.stop_string_matched = match
            self._text = self._text[:cut]
            self._num_held_back_chars = 0
            return self.stop_string_matched
        if self.stop_strings:
            self._num_held_back_chars = self._stop_prefix_length_at_end()
        return None

    def _ends_inside_byte_run(self) -> bool:
        """Whether the last token that will show in the text is a byte-fallback token."""
        if not self._facts.byte_token_ids:
            return False
        for index in range(len(self.token_ids) - 1, self._read_offset - 1, -1):
            token_id = self.token_ids[index]
            if self.skip_special_tokens and token_id in self._facts.special_token_ids:
                continue
            return token_id in self._facts.byte_token_ids
        return False

    def _find_stop(self, new_text: str) -> tuple[int, str] | None:
        """The stop string completed first once new_text follows the text so far, if any,
        with the length the text is cut to.

        "First" means the earliest end (the match generation would reach first if the text
        arrived one character at a time); on a tie the longer stop string, which starts
        earlier. So the result does not depend on how the text was split into tokens.
        """
        if not self.stop_strings:
            return None
        # A match must end inside new_text, so it starts at most this far back: searching
        # that tail keeps the cost independent of the output length.
        search_start = max(0, len(self._text) - self._longest_stop + 1)
        region = self._text[search_start:] + new_text
        best: tuple[int, int, str] | None = None  # (end in region, -length, stop)
        for stop in self.stop_strings:
            position = region.find(stop)
            if position != -1:
                candidate = (position + len(stop), -len(stop), stop)
                best = candidate if best is None or candidate < best else best
        if best is None:
            return None
        end, _, stop = best
        end += search_start
        return (end if self.params.include_stop_str_in_output else end - len(stop)), stop

    def _stop_prefix_length_at_end(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        held = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(self._text)), held, -1):
                if self._text.endswith(stop[:length]):
                    held = length
                    break
        return held
