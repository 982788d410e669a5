"""Render fitserve-tiny's README.md from training.json and eval.json.

The card is generated so that its numbers can never drift from the measured ones: rerun
``evaluate_bundled_model.py`` and the card follows.
"""

from __future__ import annotations

import textwrap


def _bulleted_files(names: list[str]) -> str:
    return textwrap.fill(", ".join(f"`{name}`" for name in names), width=100)


def render_model_card(training: dict, evaluation: dict, config, size_bytes: int) -> str:
    settings = training["settings"]
    hardware = training["hardware"]
    minutes = training["train_wall_time_s"] / 60
    tokens_seen = settings["train_steps"] * settings["batch_size"] * settings["sequence_length"]
    samples = "\n\n".join(
        f"Prompt:\n\n```python\n{s['prompt']}\n```\n\nGreedy continuation "
        f"({evaluation['sample_new_tokens']} new tokens, trailing whitespace trimmed):\n\n"
        f"```python\n{s['continuation'].rstrip()}\n```"
        for s in evaluation["samples"]
    )
    protocol = evaluation["protocol"]
    precision = ("float32 weights and optimizer state with bfloat16 matmuls (`torch.autocast`)"
                 if settings.get("autocast") == "bfloat16" else "float32")
    bos_phase = ""
    if settings.get("bos_phase_steps"):
        bos_phase = (
            f"\n\nThen a second phase of {settings['bos_phase_steps']} steps (learning rate "
            f"{settings['bos_phase_learning_rate']} decaying linearly to 0, fresh AdamW) on windows that start with "
            "`<|bos|>` at a random point of the stream: in the first phase `<|bos|>` only ever preceded the top "
            "of a file, so a prompt such as `def ` (which the tokenizer prefixes with `<|bos|>`) was unlike "
            "anything seen and greedy decoding printed `====`. About four minutes."
        )
    heldout_history = training.get("heldout_loss_history") or []
    heldout_curve = ""
    if heldout_history:
        points = ", ".join(f"{step}: {loss:.2f}" for step, loss in heldout_history)
        heldout_curve = (f"\nHeld-out loss on the first {settings.get('heldout_eval_windows')} windows during training "
                         f"(watched for over-fitting, never used to choose anything): {points}.")
    return f"""# fitserve-tiny

The model bundled with fitserve so that `fitserve generate`, `serve` and `bench` work with no
download. It is a tiny Llama (`LlamaForCausalLM`, standard Hugging Face format) trained from
scratch on Python source code. It writes plausible-looking Python; it is not useful for
anything else, and it has never seen chat data. Its job is to exercise the engine
(GQA, RoPE, tied embeddings, BOS/EOS handling, a chat template) with real, non-random weights
so greedy outputs can be compared token for token with transformers.

## Corpus

* The `*.py` files of the Python **{training['python_version']}** standard library
  (`sysconfig.get_paths()["stdlib"]`), sorted by relative path, excluding every file inside a
  directory named `test`, `tests`, `idlelib`, `tkinter`, `turtledemo`, `lib2to3`,
  `encodings`, `pydoc_data`, `site-packages` or `__pycache__`, and the `config-*` build
  directory. Other Python versions have a different stdlib, so retraining elsewhere gives
  a different (similar) model. The exact rule is in `scripts/bundled_corpus.py`.
* Held-out split: files whose index in that sorted list is a multiple of 20
  ({len(training['corpus']['heldout_files'])} files); the other
  {len(training['corpus']['train_files'])} files are training data. Held-out files:
  {_bulleted_files(training['corpus']['heldout_files'])}.
* `heldout.txt` ships here: the held-out files in order, each behind a
  `# ---- file: <path> ----` comment line, cut at the last full line within 300,000 bytes.
* Training stream: each training file as `<|bos|> text <|eos|>`, concatenated
  ({training['num_train_tokens']:,} tokens).

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training files only: vocabulary
{config.vocab_size} including the special tokens `<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2)
and the chat markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`. Encoding prepends
`<|bos|>` (like Llama tokenizers). Chat template (Jinja):
`<|bos|><|user|>\\n...<|end|>\\n<|assistant|>\\n`.

## Architecture

`LlamaForCausalLM`: hidden {config.hidden_size}, {config.num_hidden_layers} layers,
{config.num_attention_heads} query heads and {config.num_key_value_heads} KV heads
(grouped-query attention, head dim {config.hidden_size // config.num_attention_heads}),
SwiGLU MLP {config.intermediate_size}, RMSNorm eps {config.rms_norm_eps}, RoPE theta
{config.rope_parameters['rope_theta'] if getattr(config, 'rope_parameters', None) else config.rope_theta},
tied input/output embeddings, `max_position_embeddings` {config.max_position_embeddings}
(trained on {settings['sequence_length']}-token windows; longer contexts run but quality
drops). **{training['num_parameters']:,} parameters**, stored in float32:
{size_bytes / 1e6:.1f} MB for this whole directory.

## Training

AdamW (betas {tuple(settings['adam_betas'])}, weight decay {settings['weight_decay']} on matrices
only), peak learning rate {settings['peak_learning_rate']} after {settings['warmup_steps']}
linear warm-up steps, cosine decay to {settings['final_learning_rate_fraction']}x, gradient
clipping {settings['gradient_clip']}; {settings['train_steps']} steps of {settings['batch_size']}
random {settings['sequence_length']}-token windows ({tokens_seen:,} tokens, about
{tokens_seen / training['num_train_tokens']:.2f} epochs), {precision}, seed {training['seed']}.
Loss of the last logged training batch: {training['loss_history'][-1][1]} (one batch, so noisy;
the full curve is in `training.json`).{heldout_curve}{bos_phase}

Wall time **{minutes:.1f} minutes** on {hardware['torch_threads']} threads of an
`{hardware['cpu_model']}` CPU (`lscpu` model name; {hardware['os_cpu_count']} cores, shared with other
jobs, so the time is an upper bound), torch {training['torch_version']}.

Retrain and re-measure (about the same time again):

```
python scripts/train_bundled_model.py
python scripts/evaluate_bundled_model.py
```

## Evaluation

Measured with transformers, float32, on `heldout.txt` tokenized without special tokens,
in consecutive non-overlapping {protocol['window_tokens']}-token windows, scoring every token of
a window except its first:

| text | scored tokens | perplexity |
|---|---|---|
| all of heldout.txt | {evaluation['heldout_scored_tokens']:,} | **{evaluation['heldout_perplexity']:.3f}** |
| first {evaluation['subset_windows']} windows (checked by `tests/test_bundled_model.py`) | {evaluation['subset_scored_tokens']:,} | {evaluation['subset_perplexity']:.3f} |

That is about {evaluation['heldout_bits_per_byte_approx']:.2f} bits per byte of held-out source.
The numbers are also in `eval.json`; training settings and the loss curve are in `training.json`.

## Known limits

A {training['num_parameters'] / 1e6:.1f} M-parameter model trained for about an hour on two CPU
cores: it has learned the surface of the standard library's Python (indentation, keywords,
naming, comment and docstring style), not what code means. Greedy decoding of a model this
small falls into loops (a repeated comment line or statement) within a few dozen tokens, as
the samples below show; sampling (`temperature` 0.7-1.0, or a `repetition_penalty`) gives more
varied text. After {tokens_seen / training['num_train_tokens']:.1f} passes over the training
tokens the training loss ({training['loss_history'][-1][1]}) is below the held-out loss, so
more steps on this corpus would mostly over-fit; a larger corpus is what would help. The
engine's correctness tests do not depend on the quality.

## Samples

Greedy continuations (transformers, float32) of held-out snippets; see `eval.json`.

{samples}
"""
