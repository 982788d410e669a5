"""What is sent: prompts and output lengths, reproducible from `--seed`.

Prompt lengths are counted in the served model's tokens when a tokenizer is known (the
model directory, `--tokenizer`, or `--model-info`): prompts are random token ids decoded to
text and re-tokenized until the count is exact (text, not token ids, so any
OpenAI-compatible server accepts them). Without a tokenizer, prompts are random common
English words, about one token each; the report then says the lengths are approximate and
uses the server's own `usage.prompt_tokens` where it reports it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "number night point home water room mother area money story fact month lot right study "
    "book eye job word business issue side kind head house service friend father power hour "
    "game line end member law car city name team minute idea kid body back parent face level "
    "office door health person art war history party result change morning reason research "
    "girl guy moment air teacher force education light river green small large good new old "
    "great high little long young early open blue red cold warm fast slow bright quiet"
).split()


@dataclass(frozen=True)
class LengthSpec:
    """A distribution of token counts: fixed, uniform (mean ± spread·mean) or normal
    (standard deviation spread·mean), rounded and clipped to at least `minimum`."""

    mean: int
    distribution: str = "fixed"
    spread: float = 0.25
    minimum: int = 1

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise ValueError(f"length must be >= 1 token (got {self.mean})")
        if self.distribution not in ("fixed", "uniform", "normal"):
            raise ValueError(f"length distribution must be fixed, uniform or normal (got {self.distribution!r})")
        if self.spread < 0:
            raise ValueError(f"length spread must be >= 0 (got {self.spread})")

    def sample(self, rng: np.random.Generator, count: int) -> list[int]:
        if self.distribution == "fixed":
            values = np.full(count, float(self.mean))
        elif self.distribution == "uniform":
            half_width = self.spread * self.mean
            values = rng.uniform(self.mean - half_width, self.mean + half_width, size=count)
        else:
            values = rng.normal(self.mean, self.spread * self.mean, size=count)
        return [max(self.minimum, int(round(value))) for value in values]

    def describe(self) -> str:
        if self.distribution == "fixed":
            return f"{self.mean} (fixed)"
        return f"{self.mean} ({self.distribution}, spread {self.spread:g}·mean)"


@dataclass
class Turn:
    """One request's own part: the user text of this turn and how many tokens to generate."""

    prompt: str
    input_tokens: int
    output_tokens: int


@dataclass
class Conversation:
    """Requests sent one after another, each carrying the history before it (one turn for
    single-turn workloads). Arrivals and the concurrency cap apply to whole conversations."""

    conversation_id: int
    turns: list[Turn]
    prefix_group: int | None = None
    client: str | None = None
    """multi-tenant: who sends it (the OpenAI `user` field of its requests)."""


@dataclass
class WorkloadConfig:
    kind: str = "synthetic"
    """synthetic, sharegpt, shared-prefix, multi-turn or multi-tenant."""
    num_requests: int = 100
    """Requests (HTTP calls) in all; multi-turn: num_requests // num_turns conversations."""
    input_len: LengthSpec = field(default_factory=lambda: LengthSpec(128))
    output_len: LengthSpec = field(default_factory=lambda: LengthSpec(128))
    dataset_path: str | None = None
    """ShareGPT-format JSON (a list of {"conversations": [{"from", "value"}, ...]})."""
    prefix_len: int = 256
    """shared-prefix: tokens of the prefix every request of a group shares."""
    num_prefixes: int = 4
    """shared-prefix: how many distinct prefixes (groups)."""
    num_turns: int = 3
    """multi-turn: turns per conversation."""
    num_clients: int = 4
    """multi-tenant: clients sending requests (named client-0, client-1, ...)."""
    client_rates: list[float] | None = None
    """multi-tenant: relative request rate of each client (None: equal). Each request of the
    arrival process goes to client i with probability rate_i / sum(rates), which splits a
    Poisson process into independent Poisson processes at those rates."""
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"kind": self.kind, "num_requests": self.num_requests,
                                     "seed": self.seed}
        if self.kind == "sharegpt":
            described["dataset_path"] = self.dataset_path
        else:
            described["input_len"] = self.input_len.describe()
            described["output_len"] = self.output_len.describe()
        if self.kind == "shared-prefix":
            described.update(prefix_len=self.prefix_len, num_prefixes=self.num_prefixes)
        if self.kind == "multi-turn":
            described["num_turns"] = self.num_turns
        if self.kind == "multi-tenant":
            described.update(num_clients=self.num_clients, client_rates=self.relative_client_rates())
        return described

    def relative_client_rates(self) -> list[float]:
        """Each client's relative rate (validated: one positive rate per client)."""
        if self.num_clients < 1:
            raise ValueError(f"multi-tenant needs --clients >= 1 (got {self.num_clients})")
        rates = self.client_rates or [1.0] * self.num_clients
        if len(rates) != self.num_clients:
            raise ValueError(f"--client-rates gives {len(rates)} rates for {self.num_clients} clients; give one per client")
        if not all(rate > 0 and math.isfinite(rate) for rate in rates):
            raise ValueError(f"--client-rates must all be positive numbers (got {rates})")
        return list(rates)


class PromptMaker:
    """Random prompt text of a given length in tokens (exact with a tokenizer)."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self._allowed_ids = np.array(_whole_word_token_ids(tokenizer))

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` (estimated as words · 4/3 without a tokenizer)."""
        if self.tokenizer is None:
            return max(1, round(len(text.split()) * 4 / 3))
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def make(self, num_tokens: int, rng: np.random.Generator) -> tuple[str, int]:
        """(text, its token count); the count equals num_tokens whenever the tokenizer allows."""
        if self.tokenizer is None:
            words = rng.choice(len(_WORDS), size=num_tokens)
            return " ".join(_WORDS[index] for index in words), num_tokens
        ids = rng.choice(self._allowed_ids, size=num_tokens).tolist()
        text, count = "", 0
        # Decoding random ids and encoding again merges or splits some pieces; trim or top up
        # until the round trip lands on the asked length (a few rounds suffice in practice).
        for _ in range(10):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            count = self.count_tokens(text)
            if count == num_tokens:
                break
            if count > num_tokens:
                ids = ids[: max(1, len(ids) - (count - num_tokens))]
            else:
                ids += rng.choice(self._allowed_ids, size=num_tokens - count).tolist()
        return text, count


def _whole_word_token_ids(tokenizer: Any) -> list[int]:
    """Ids of word tokens (a word-start marker, Ġ or ▁, then letters) that survive
    decode → encode unchanged.

    Pre-tokenizers split text at spaces, so a run of such tokens cannot merge across token
    boundaries: decoding random ones and encoding the text again gives the same count. Random
    ids in general do not (byte pieces of multi-byte characters decode to U+FFFD, neighbours
    merge), so they are only the fallback for tokenizers with too few whole-word tokens.
    """
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [token_id for token_id in range(len(tokenizer)) if token_id not in special_ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    candidates = [token_id for token_id, piece in zip(ids, pieces)
                  if isinstance(piece, str) and len(piece) >= 2 and piece[0] in ("Ġ", "▁")
                  and piece[1:].isascii() and piece[1:].isalpha()]
    if not candidates:
        return ids
    texts = tokenizer.batch_decode([[token_id] for token_id in candidates])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    whole_words = [token_id for token_id, round_trip in zip(candidates, encoded) if round_trip == [token_id]]
    return whole_words if len(whole_words) >= 16 else ids


def build_workload(config: WorkloadConfig, prompt_maker: PromptMaker) -> list[Conversation]:
    """The conversations of a run; the same config and seed give the same prompts."""
    rng = np.random.default_rng([config.seed, 1])
    if config.num_requests < 1:
        raise ValueError(f"num_requests must be >= 1 (got {config.num_requests})")
    if config.kind == "synthetic":
        return _synthetic(config, prompt_maker, rng)
    if config.kind == "sharegpt":
        return _sharegpt(config, prompt_maker, rng)
    if config.kind == "shared-prefix":
        return _shared_prefix(config, prompt_maker, rng)
    if config.kind == "multi-turn":
        return _multi_turn(config, prompt_maker, rng)
    if config.kind == "multi-tenant":
        return _multi_tenant(config, prompt_maker, rng)
    raise ValueError(f"unknown workload {config.kind!r}: use synthetic, sharegpt, shared-prefix, multi-turn "
                     "or multi-tenant")


def _synthetic(config: WorkloadConfig, maker: PromptMaker, rng: np.random.Generator) -> list[Conversation]:
    input_lens = config.input_len.sample(rng, config.num_requests)
    output_lens = config.output_len.sample(rng, config.num_requests)
    conversations = []
    for index, (input_len, output_len) in enumerate(zip(input_lens, output_lens)):
        text, count = maker.make(input_len, rng)
        conversations.append(Conversation(index, [Turn(text, count, output_len)]))
    return conversations


def _multi_tenant(config: WorkloadConfig, maker: PromptMaker, rng: np.random.Generator) -> list[Conversation]:
    """Synthetic requests, each owned by a client drawn in proportion to the client rates."""
    rates = np.asarray(config.relative_client_rates())
    owners = rng.choice(len(rates), size=config.num_requests, p=rates / rates.sum())
    conversations = _synthetic(config, maker, rng)
    for conversation, owner in zip(conversations, owners):
        conversation.client = client_name(int(owner))
    return conversations


def client_name(index: int) -> str:
    return f"client-{index}"


def _shared_prefix(config: WorkloadConfig, maker: PromptMaker, rng: np.random.Generator) -> list[Conversation]:
    if config.num_prefixes < 1 or config.prefix_len < 1:
        raise ValueError("shared-prefix needs --num-prefixes >= 1 and --prefix-len >= 1")
    prefixes = [maker.make(config.prefix_len, rng)[0] for _ in range(config.num_prefixes)]
    suffix_lens = config.input_len.sample(rng, config.num_requests)
    output_lens = config.output_len.sample(rng, config.num_requests)
    conversations = []
    for index, (suffix_len, output_len) in enumerate(zip(suffix_lens, output_lens)):
        group = index % config.num_prefixes
        suffix, _ = maker.make(suffix_len, rng)
        # Tokenizer prompts already start with a space (whole-word tokens); word prompts do not.
        text = prefixes[group] + ("" if suffix.startswith(" ") else " ") + suffix
        conversations.append(Conversation(index, [Turn(text, maker.count_tokens(text), output_len)], group))
    return conversations


def _multi_turn(config: WorkloadConfig, maker: PromptMaker, rng: np.random.Generator) -> list[Conversation]:
    if config.num_turns < 1:
        raise ValueError(f"multi-turn needs --num-turns >= 1 (got {config.num_turns})")
    num_conversations = max(1, config.num_requests // config.num_turns)
    conversations = []
    for conversation_id in range(num_conversations):
        input_lens = config.input_len.sample(rng, config.num_turns)
        output_lens = config.output_len.sample(rng, config.num_turns)
        turns = []
        for input_len, output_len in zip(input_lens, output_lens):
            text, count = maker.make(input_len, rng)
            turns.append(Turn(text, count, output_len))
        conversations.append(Conversation(conversation_id, turns))
    return conversations


def _sharegpt(config: WorkloadConfig, maker: PromptMaker, rng: np.random.Generator) -> list[Conversation]:
    """First human turn as the prompt, the length of the reply that followed as max_tokens."""
    if not config.dataset_path:
        raise ValueError("the sharegpt workload needs --dataset-path FILE (ShareGPT-format JSON)")
    path = Path(config.dataset_path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read ShareGPT file {path}: {error}") from error
    pairs: list[tuple[str, str]] = []
    for entry in entries if isinstance(entries, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if first.get("from") in ("human", "user") and second.get("from") in ("gpt", "assistant", "chatgpt"):
            pairs.append((str(first.get("value", "")), str(second.get("value", ""))))
    if not pairs:
        raise ValueError(f"{path} has no conversation starting with a human turn followed by a gpt turn")
    order = rng.permutation(len(pairs))
    conversations = []
    for index in range(config.num_requests):
        prompt, reply = pairs[order[index % len(pairs)]]
        input_tokens = maker.count_tokens(prompt)
        output_tokens = max(1, maker.count_tokens(reply))
        conversations.append(Conversation(index, [Turn(prompt, input_tokens, output_tokens)]))
    return conversations
