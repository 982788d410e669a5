"""Train fitserve's bundled default model (``fitserve/assets/fitserve-tiny``) from scratch.

Every fitserve command must work offline, so the package ships a small Llama trained here on
the Python standard library's source (see ``bundled_corpus.py`` for the exact file list and
split). Rerunning this script with the same Python version and torch build reproduces the
model: every random choice is seeded and the step count is fixed rather than time-limited.

    python scripts/train_bundled_model.py                    # tokenizer + training + save
    python scripts/evaluate_bundled_model.py                 # eval.json, samples, README.md

``--time-steps N`` runs N steps and prints the speed, to size a new configuration.
"""

from __future__ import annotations

import os

# The machine is shared: keep the tokenizer's Rust thread pool at the same two cores as torch.
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# On an oversubscribed machine OpenMP's default spin-waiting burns the CPU share the other
# thread needs; sleeping waiters made training steps ~2.5x faster there (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled_corpus import CorpusSplit, heldout_text, python_version, split_corpus  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "fitserve" / "assets" / "fitserve-tiny"

SEED = 1234
VOCAB_SIZE = 4096
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_MARKERS]  # ids 0..6, in this order
# The model never saw chat data; the template exists so chat endpoints have a well-defined
# prompt format to render and tokenize.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=384,
    intermediate_size=768,          # 2x hidden: keeps the float32 checkpoint under ~40 MB
    num_hidden_layers=6,
    num_attention_heads=6,          # head_dim 64, as in most Llama-family models
    num_key_value_heads=2,          # grouped-query attention, 3 query heads per KV head
    max_position_embeddings=2048,   # trained on SEQUENCE_LENGTH windows; longer is allowed
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

SEQUENCE_LENGTH = 512
BATCH_SIZE = 8
TRAIN_STEPS = 3000                  # ~12 M tokens: about 5.6 passes over the training files
PEAK_LEARNING_RATE = 1.5e-3
FINAL_LEARNING_RATE_FRACTION = 0.1
WARMUP_STEPS = 150
# Matmuls in bfloat16 under autocast (weights, optimizer state and the saved checkpoint stay
# float32). On CPUs with AMX or AVX512-BF16 this trains ~1.8x faster than float32 (measured on
# a 2-core Xeon); elsewhere it is still correct, only slower.
AUTOCAST_BF16 = True
# Second phase: windows that start with <|bos|> at a random point of the stream. In the first
# phase <|bos|> only ever precedes the top of a file (a docstring or licence comment), so a
# prompt like "def " -- which the tokenizer prefixes with <|bos|> -- was far outside what the
# model had seen, and greedy decoding printed "====...". A short phase teaches it that code of
# any kind can follow <|bos|>; held-out perplexity is measured after it.
BOS_PHASE_STEPS = 250
BOS_PHASE_LEARNING_RATE = 3e-4      # decays linearly to 0
# Held-out loss on a few windows is printed this often, to watch for over-fitting; it never
# influences training.
EVAL_EVERY = 250
EVAL_WINDOWS = 16
WEIGHT_DECAY = 0.1
GRADIENT_CLIP = 1.0
NUM_THREADS = 2


def train_tokenizer(split: CorpusSplit) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the training files only, so held-out text stays unseen."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator((split.read(name) for name in split.train_files), trainer=trainer)
    # Prepend BOS like Llama tokenizers do, so a plain `tokenizer(prompt)` matches training.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_MARKERS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,  # code: never touch spaces around punctuation
    )


def encode_training_stream(tokenizer: PreTrainedTokenizerFast, split: CorpusSplit) -> torch.Tensor:
    """All training files as one token stream: ``<|bos|> file <|eos|>`` per file, in order."""
    texts = [split.read(name) for name in split.train_files]
    encodings = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream: list[int] = []
    for ids in encodings:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.int32)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    return LlamaForCausalLM(config)


def learning_rate_at(step: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay to FINAL_LEARNING_RATE_FRACTION of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    floor = FINAL_LEARNING_RATE_FRACTION
    return PEAK_LEARNING_RATE * (floor + (1.0 - floor) * cosine)


def make_optimizer(model: LlamaForCausalLM) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms' gains are not shrunk toward zero."""
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    not_decayed = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decayed, "weight_decay": WEIGHT_DECAY}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=PEAK_LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8,
    )


@torch.inference_mode()
def heldout_loss(model: LlamaForCausalLM, heldout_ids: torch.Tensor) -> float:
    """Mean next-token loss (float32) over EVAL_WINDOWS windows of the held-out text."""
    was_training = model.training
    model.eval()
    windows = heldout_ids[: EVAL_WINDOWS * SEQUENCE_LENGTH].view(-1, SEQUENCE_LENGTH).long()
    logits = model(input_ids=windows).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
    model.train(was_training)
    return loss.item()


def training_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> torch.Tensor:
    """One optimizer step of next-token prediction on `batch` [rows, tokens]; returns the loss.
    Shared by both phases, so they differ only in how windows are drawn and the learning rate."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST_BF16):
        logits = model(input_ids=batch[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
    optimizer.step()
    return loss


def train(model: LlamaForCausalLM, stream: torch.Tensor, total_steps: int, log_every: int = 10,
          checkpoint_dir: Path | None = None, checkpoint_every: int = 100,
          heldout_ids: torch.Tensor | None = None) -> dict:
    """Random SEQUENCE_LENGTH windows from the stream; returns timing and loss history.

    Periodic weight-only checkpoints let a long run on a shared machine be inspected (and
    sampled) while it trains; they do not affect the result. Nor does the held-out loss, which
    is only printed and recorded.
    """
    generator = torch.Generator().manual_seed(SEED)
    optimizer = make_optimizer(model)
    model.train()
    losses: list[tuple[int, float]] = []
    heldout_losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total_steps)
        starts = torch.randint(0, len(stream) - SEQUENCE_LENGTH - 1, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([stream[s : s + SEQUENCE_LENGTH + 1] for s in starts.tolist()]).long()
        loss = training_step(model, optimizer, batch)
        if step % log_every == 0 or step == total_steps - 1:
            elapsed = time.perf_counter() - started
            losses.append((step, round(loss.item(), 4)))
            print(f"step {step:5d}/{total_steps}  loss {loss.item():.4f}  lr {learning_rate_at(step, total_steps):.2e}"
                  f"  {elapsed:7.1f}s  ({elapsed / (step + 1):.2f} s/step)", flush=True)
        if heldout_ids is not None and ((step + 1) % EVAL_EVERY == 0 or step == total_steps - 1):
            value = heldout_loss(model, heldout_ids)
            heldout_losses.append((step + 1, round(value, 4)))
            print(f"step {step + 1:5d}  held-out loss {value:.4f}  perplexity {math.exp(value):.2f}", flush=True)
        if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0:
            model.save_pretrained(checkpoint_dir, safe_serialization=True)
    model.eval()
    return {"train_wall_time_s": round(time.perf_counter() - started, 1), "loss_history": losses,
            "heldout_loss_history": heldout_losses}


def train_bos_anchored(model: LlamaForCausalLM, stream: torch.Tensor, bos_token_id: int) -> dict:
    """The second phase (see BOS_PHASE_STEPS): <|bos|> + SEQUENCE_LENGTH stream tokens per row,
    a fresh AdamW, its own random generator so the phase is the same however it is run."""
    generator = torch.Generator().manual_seed(SEED + 1)
    optimizer = make_optimizer(model)
    model.train()
    bos = torch.tensor([bos_token_id])
    losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    for step in range(BOS_PHASE_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = BOS_PHASE_LEARNING_RATE * (1 - step / BOS_PHASE_STEPS)
        starts = torch.randint(0, len(stream) - SEQUENCE_LENGTH, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([torch.cat([bos, stream[s : s + SEQUENCE_LENGTH].long()]) for s in starts.tolist()])
        loss = training_step(model, optimizer, batch)
        if step % 50 == 0 or step == BOS_PHASE_STEPS - 1:
            losses.append((step, round(loss.item(), 4)))
            print(f"bos phase step {step:4d}/{BOS_PHASE_STEPS}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return {"bos_phase_wall_time_s": round(time.perf_counter() - started, 1), "bos_phase_loss_history": losses}


def hardware_description() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpu_model": cpu, "torch_threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count()}


def make_tokenizer_config_portable(output_dir: Path) -> None:
    """Name the tokenizer class that both transformers 4.x and 5.x resolve.

    transformers 5 writes its new class name `TokenizersBackend`, which 4.x (still allowed by
    pyproject) cannot load; `PreTrainedTokenizerFast` loads as the same class in 5.x.
    """
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, split: CorpusSplit,
         training_report: dict, num_train_tokens: int, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    make_tokenizer_config_portable(output_dir)
    (output_dir / "heldout.txt").write_text(heldout_text(split), encoding="utf-8")
    record = {
        "python_version": python_version(),
        "torch_version": torch.__version__,
        "seed": SEED,
        "corpus": {"train_files": split.train_files, "heldout_files": split.heldout_files},
        "num_train_tokens": num_train_tokens,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "settings": {
            "vocab_size": VOCAB_SIZE, "sequence_length": SEQUENCE_LENGTH, "batch_size": BATCH_SIZE,
            "train_steps": TRAIN_STEPS,
            "peak_learning_rate": PEAK_LEARNING_RATE, "final_learning_rate_fraction": FINAL_LEARNING_RATE_FRACTION,
            "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY, "gradient_clip": GRADIENT_CLIP,
            "adam_betas": [0.9, 0.95], "dtype": "float32",
            "autocast": "bfloat16" if AUTOCAST_BF16 else None,
            "heldout_eval_every": EVAL_EVERY, "heldout_eval_windows": EVAL_WINDOWS,
            "bos_phase_steps": BOS_PHASE_STEPS, "bos_phase_learning_rate": BOS_PHASE_LEARNING_RATE, **MODEL_SHAPE,
        },
        "hardware": hardware_description(),
        **training_report,
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--time-steps", type=int, default=0, help="only time this many steps, save nothing")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="save weights here every 100 steps")
    args = parser.parse_args()

    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(SEED)
    split = split_corpus()
    print(f"Python {python_version()} stdlib: {len(split.train_files)} training files, "
          f"{len(split.heldout_files)} held-out files", flush=True)
    tokenizer = train_tokenizer(split)
    stream = encode_training_stream(tokenizer, split)
    model = build_model(tokenizer)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"{len(stream):,} training tokens, vocab {len(tokenizer)}, {num_parameters:,} parameters", flush=True)
    steps = args.time_steps or TRAIN_STEPS
    heldout_ids = torch.tensor(tokenizer(heldout_text(split), add_special_tokens=False)["input_ids"])
    report = train(model, stream, steps, log_every=1 if args.time_steps else 10,
                   checkpoint_dir=args.checkpoint_dir, heldout_ids=heldout_ids)
    if args.time_steps:
        return
    report |= train_bos_anchored(model, stream, tokenizer.bos_token_id)
    save(model, tokenizer, split, report, len(stream), args.output_dir)
    print(f"saved to {args.output_dir}", flush=True)


if __name__ == "__main__":
    main()
