"""Streaming detokenization: monotonic text, exact final text, stop strings.

Tokenizers are trained offline on a tiny corpus with the `tokenizers` library, one per
decoding style the Llama family uses: byte-level BPE (Llama 3, Qwen), Metaspace BPE
(SentencePiece-converted), and SentencePiece with byte fallback and a Strip decoder (Llama 2).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fitserve.engine.detokenizer import IncrementalDetokenizer
from fitserve.sampling_params import SamplingParams

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, jalapeño, Ærøskøbing, smörgåsbord.",
    "東京は日本の首都です。北京欢迎你。서울은 한국의 수도입니다.",
    "Emoji time 😀🎉👍🏽 and flags 🇫🇷 plus 👨‍👩‍👧 families.",
    "Numbers 12345 and symbols €£¥ • — “quotes” ‘single’ …",
    "def main():\n    print('hi')\n\treturn 0\n",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|eot|>"]


def wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|eot|>"],
    )


def byte_level_bpe() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    return wrap(backend)


def metaspace_bpe() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    return wrap(backend)


def byte_fallback_sentencepiece() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    # A small alphabet so that CJK, emoji and some ASCII fall back to <0xNN> byte tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, limit_alphabet=40, show_progress=False
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return wrap(backend)


BUILDERS = {
    "byte_level": byte_level_bpe,
    "metaspace": metaspace_bpe,
    "byte_fallback": byte_fallback_sentencepiece,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return BUILDERS[request.param]()


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    return metaspace_bpe()


def stream(
    tokenizer: PreTrainedTokenizerFast, token_ids: list[int], params: SamplingParams
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed tokens one at a time; return the detokenizer, every output_text seen, the stop match."""
    detokenizer = IncrementalDetokenizer(tokenizer, [], params)
    seen = [detokenizer.output_text]
    matched = None
    for token_id in token_ids:
        matched = detokenizer.append([token_id])
        seen.append(detokenizer.output_text)
        if matched is not None:
            break
    return detokenizer, seen, matched


def assert_monotonic(texts: list[str]) -> None:
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier), (earlier, later)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_is_monotonic_and_ends_equal_to_decode(
    tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    eos = tokenizer.convert_tokens_to_ids("</s>")
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    for text in CORPUS:
        token_ids = encode(tokenizer, " " + text) + [eot] + encode(tokenizer, text[::-1]) + [eos]
        detokenizer, seen, _ = stream(
            tokenizer, token_ids, SamplingParams(skip_special_tokens=skip_special_tokens)
        )
        final = detokenizer.finish()
        assert_monotonic(seen + [final])
        assert final == tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_random_token_sequences_match_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    # Random ids produce broken UTF-8, stray special tokens and lone spaces: the hard cases.
    rng = random.Random(0)
    for _ in range(120):
        token_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 30))]
        for skip_special_tokens in (True, False):
            params = SamplingParams(skip_special_tokens=skip_special_tokens)
            detokenizer, seen, _ = stream(tokenizer, token_ids, params)
            final = detokenizer.finish()
            assert_monotonic(seen + [final])
            assert final == tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_split_characters_are_never_shown_half_decoded(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "東京は日本の首都です。 Emoji 😀🎉👍🏽 🇫🇷 Café"
    token_ids = encode(tokenizer, text)
    _, seen, _ = stream(tokenizer, token_ids, SamplingParams())
    assert all("\ufffd" not in shown for shown in seen)
    assert seen[-1] == tokenizer.decode(token_ids)


def test_byte_level_splits_characters_across_tokens(byte_level: PreTrainedTokenizerFast) -> None:
    # Guards the test above: the byte-level tokenizer really cuts some characters in pieces.
    pieces = [byte_level.decode([token_id]) for token_id in encode(byte_level, "東京 😀")]
    assert any("\ufffd" in piece for piece in pieces)


def test_sentencepiece_space_of_the_first_token_is_dropped_later_ones_kept(
    metaspace: PreTrainedTokenizerFast,
) -> None:
    token_ids = encode(metaspace, "Hello world! The quick brown fox")
    _, seen, _ = stream(metaspace, token_ids, SamplingParams())
    assert seen[-1] == "Hello world! The quick brown fox" == metaspace.decode(token_ids)
    assert not seen[1].startswith(" ")


def test_stop_string_across_tokens_cuts_the_text(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    token_ids = encode(tokenizer, text)
    detokenizer, seen, matched = stream(tokenizer, token_ids, SamplingParams(stop=["wn fox ju"]))
    assert matched == "wn fox ju"
    expected = tokenizer.decode(token_ids).split("wn fox ju")[0]
    # Every streamed value is a prefix of the cut text: no part of the stop string leaked.
    assert_monotonic(seen)
    assert seen[-1] == expected
    assert detokenizer.finish() == expected


def test_include_stop_str_in_output_keeps_the_stop(tokenizer: PreTrainedTokenizerFast) -> None:
    token_ids = encode(tokenizer, "The quick brown fox jumps over the lazy dog.")
    params = SamplingParams(stop=["fox"], include_stop_str_in_output=True)
    detokenizer, seen, matched = stream(tokenizer, token_ids, params)
    assert matched == "fox"
    assert_monotonic(seen)
    assert detokenizer.output_text.endswith("brown fox")


def test_first_completed_of_several_stop_strings_wins(byte_level: PreTrainedTokenizerFast) -> None:
    token_ids = encode(byte_level, "The quick brown fox jumps")
    detokenizer = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["jumps", "quick b"]))
    # All tokens in one append: both stops appear in the new text; the one completed first
    # ends it, whatever the order of the stop list.
    assert detokenizer.append(token_ids) == "quick b"
    assert detokenizer.output_text == "The "
    # Nothing changes after a match.
    assert detokenizer.append(encode(byte_level, " more")) == "quick b"
    assert detokenizer.finish() == "The "


def reference_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The text as if it arrived one character at a time: the first stop string completed."""
    for end in range(1, len(text) + 1):
        completed = [stop for stop in stops if text[:end].endswith(stop)]
        if completed:
            stop = max(completed, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def test_stop_result_does_not_depend_on_how_tokens_arrive(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    rng = random.Random(1)
    text = "The quick brown fox jumps over the lazy dog. 東京は日本の首都です。"
    token_ids = encode(tokenizer, text)
    decoded = tokenizer.decode(token_ids)
    stop_sets = [
        ["brown fox jumps", "own f"],
        ["lazy", "zy dog", "y"],
        ["日本の首", "本"],
        ["absent"],
    ]
    for stops in stop_sets:
        for include in (False, True):
            expected_text, expected_stop = reference_cut(decoded, stops, include)
            for _ in range(5):
                params = SamplingParams(stop=stops, include_stop_str_in_output=include)
                detokenizer = IncrementalDetokenizer(tokenizer, [], params)
                seen, position, matched = [""], 0, None
                while position < len(token_ids) and matched is None:
                    size = rng.randint(1, 4)
                    matched = detokenizer.append(token_ids[position : position + size])
                    position += size
                    seen.append(detokenizer.output_text)
                final = detokenizer.finish()
                assert_monotonic(seen + [final])
                assert (final, matched) == (expected_text, expected_stop)


def test_random_outputs_with_stop_strings_match_the_reference(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    rng = random.Random(2)
    for _ in range(60):
        text = rng.choice(CORPUS)
        token_ids = encode(tokenizer, text[rng.randrange(len(text) // 2) :])
        decoded = tokenizer.decode(token_ids)
        # Stop strings cut from the text itself (so they occur) plus one that never does.
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(decoded))
            stops.append(decoded[start : start + rng.randint(1, 6)])
        stops.append("never here")
        include = rng.random() < 0.5
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        detokenizer, seen, matched = stream(tokenizer, token_ids, params)
        final = detokenizer.finish()
        assert_monotonic(seen + [final])
        assert (final, matched) == reference_cut(decoded, stops, include)


def test_stop_string_with_multibyte_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    token_ids = encode(tokenizer, "東京は日本の首都です。北京欢迎你。")
    detokenizer, seen, matched = stream(tokenizer, token_ids, SamplingParams(stop=["首都"]))
    assert matched == "首都"
    assert_monotonic(seen)
    assert detokenizer.output_text == "東京は日本の"


def test_stop_string_is_caught_on_the_token_that_completes_it(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    # No token is generated past a stop string, even when it ends inside a run of
    # byte-fallback tokens or right before a character that is still incomplete.
    token_ids = encode(tokenizer, "東京は日本の首都です。北京欢迎你。 Emoji 😀🎉 x")
    for stop in ["首都", "。", "欢迎", "Emoji 😀", "🎉"]:
        completing = next(
            count
            for count in range(1, len(token_ids) + 1)
            if stop in tokenizer.decode(token_ids[:count])
        )
        _, seen, matched = stream(tokenizer, token_ids, SamplingParams(stop=[stop]))
        assert matched == stop
        assert len(seen) - 1 == completing


def test_held_back_tail_is_released_by_finish(byte_level: PreTrainedTokenizerFast) -> None:
    token_ids = encode(byte_level, "Hello world! The quick brown fo")
    detokenizer, seen, matched = stream(byte_level, token_ids, SamplingParams(stop=["fox!", "wor"]))
    # "wor" matches first, so use a separate stream for the held-back case.
    assert matched == "wor"
    detokenizer, seen, matched = stream(byte_level, token_ids, SamplingParams(stop=["fox!"]))
    assert matched is None
    assert detokenizer.output_text == "Hello world! The quick brown "
    assert detokenizer.finish() == "Hello world! The quick brown fo"
    assert_monotonic(seen + [detokenizer.output_text])


def test_skip_special_tokens_controls_their_text(byte_level: PreTrainedTokenizerFast) -> None:
    eos = byte_level.convert_tokens_to_ids("</s>")
    token_ids = encode(byte_level, "Hello") + [eos]
    kept, _, _ = stream(byte_level, token_ids, SamplingParams(skip_special_tokens=False))
    skipped, _, _ = stream(byte_level, token_ids, SamplingParams(skip_special_tokens=True))
    assert kept.finish() == "Hello</s>"
    assert skipped.finish() == "Hello"


def test_decode_token_keeps_leading_spaces_and_special_text(
    metaspace: PreTrainedTokenizerFast, byte_level: PreTrainedTokenizerFast
) -> None:
    for tokenizer in (metaspace, byte_level):
        detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
        token_ids = encode(tokenizer, "over the lazy dog")
        pieces = tokenizer.convert_ids_to_tokens(token_ids)
        # The first token after the start that carries a space marker plus a letter.
        index = next(
            i for i in range(1, len(pieces)) if pieces[i][0] in "▁Ġ" and len(pieces[i]) > 1
        )
        before, space_word = token_ids[:index], token_ids[index]
        # A token's text is what it adds after the text before it, space included.
        expected = tokenizer.decode(before + [space_word])[len(tokenizer.decode(before)) :]
        assert expected.startswith(" ")
        assert detokenizer.decode_token(space_word) == expected
        assert detokenizer.decode_token(tokenizer.convert_tokens_to_ids("</s>")) == "</s>"


class CountingTokenizer:
    """Delegates to a real tokenizer and records how many ids each decode call received.

    It hides `backend_tokenizer`, so the detokenizer has to go through `decode`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def __getattr__(self, name: str):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def decode(self, token_ids: list[int], **kwargs) -> str:
        self.decoded_lengths.append(len(token_ids))
        return self._tokenizer.decode(token_ids, **kwargs)


def test_long_output_decodes_bounded_windows(tokenizer: PreTrainedTokenizerFast) -> None:
    token_ids = encode(tokenizer, " ".join(CORPUS * 30))
    assert len(token_ids) > 1000
    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting, [], SamplingParams(stop=["never appears"]))
    for token_id in token_ids:
        detokenizer.append([token_id])
    assert detokenizer.finish() == tokenizer.decode(token_ids)
    # Work per token does not grow with the output: every decode sees a short window (the
    # last emitted chunk plus tokens still pending, at most a few dozen here where a CJK
    # sentence falls back to byte tokens), and there are at most two decodes per token.
    assert max(counting.decoded_lengths) <= 40
    assert len(counting.decoded_lengths) <= 2 * len(token_ids) + 2


class ShoutingTokenizer(PreTrainedTokenizerFast):
    """A tokenizer class that changes decode; its text must not be bypassed."""

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()


def test_a_tokenizer_that_overrides_decode_is_respected() -> None:
    shouting = ShoutingTokenizer(tokenizer_object=byte_level_bpe().backend_tokenizer)
    token_ids = encode(shouting, "Hello world")
    detokenizer, _, _ = stream(shouting, token_ids, SamplingParams())
    assert detokenizer.finish() == "HELLO WORLD" == shouting.decode(token_ids)
