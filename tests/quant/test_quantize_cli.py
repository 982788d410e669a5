"""`fitserve quantize` and `--quantization` from the command line, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fitserve.cli import main
from fitserve.models.loader import load_model
from tests.tiny_models import write_tiny_checkpoint


def test_quantize_writes_a_directory_every_command_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = write_tiny_checkpoint(tmp_path / "dense", "llama2")
    (dense / "generation_config.json").write_text("{}")
    (dense / "model-bf16.gguf").write_bytes(b"GGUF")  # other formats' weights stay behind
    out = tmp_path / "w4"
    assert main(["quantize", str(dense), "--method", "w4", "--group-size", "32", "--out", str(out), "--json"]) == 0
    assert (out / "generation_config.json").is_file() and not (out / "model-bf16.gguf").exists()
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "w4" and summary["linear_bits_per_weight"] == pytest.approx(4 + 24 / 32)
    # The untied float32 embedding stays dense (it is only indexed); the rest shrinks ~7x.
    assert summary["size_bytes"] == (out / "model.safetensors").stat().st_size < summary["original_size_bytes"] / 2
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fitserve", "method": "w4", "bits": 4,
                                             "group_size": 32, "lm_head": "w8"}
    model, _ = load_model(out, torch.float32, torch.device("cpu"), "torch")
    assert model.model.layers[1].mlp.down_proj.weight_format.name == "w4" and model.lm_head.weight_format.name == "w8"


def test_quantize_errors_are_one_line_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = write_tiny_checkpoint(tmp_path / "dense", "llama2")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("x")
    assert main(["quantize", str(dense), "--method", "w8", "--out", str(tmp_path / "exists")]) == 2
    assert main(["quantize", str(dense), "--method", "w4", "--group-size", "48", "--out", str(tmp_path / "o")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--force" in errors[0] and "--group-size 64" in errors[1]
    with pytest.raises(SystemExit):  # argparse names the valid methods
        main(["quantize", str(dense), "--method", "int3", "--out", str(tmp_path / "o")])


def test_calibration_files_that_cannot_be_used_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fitserve.config import default_model_dir

    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "def f(): pass"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    for path, message in ((empty, "is empty"), (short, "at least 256"), (broken, "not a JSON line")):
        code = main(["quantize", str(default_model_dir()), "--method", "mixllm", "--out", str(tmp_path / "o"),
                     "--force", "--calibration-data", str(path)])
        assert code == 2
        assert message in capsys.readouterr().err


def test_generate_quantizes_while_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--quantization", "w8", "--prompt", "def ", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit):
        main(["generate", "--quantization", "mixllm", "--prompt", "def "])


def test_quantize_bitstack_writes_the_block_order_and_refuses_bad_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from safetensors import safe_open

    from fitserve.config import default_model_dir

    dense = write_tiny_checkpoint(tmp_path / "dense", "llama2", vocab_size=4096)
    shutil.copy(default_model_dir() / "tokenizer.json", dense / "tokenizer.json")
    text = tmp_path / "calibration.txt"
    text.write_text(Path(json.__file__).read_text())
    out = tmp_path / "bitstack"
    common = ["quantize", str(dense), "--method", "bitstack", "--calibration-data", str(text),
              "--num-calibration-tokens", "512"]
    assert main([*common, "--num-blocks", "3", "--rank", "auto", "--ordering", "residual", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "bitstack" and summary["ordering"] == "residual"
    assert summary["smallest_loadable_bytes"] < summary["full_stack_bytes"] <= summary["size_bytes"]
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(settings["ranks"].values()) <= {2, 4, 8, 16} and len(settings["ranks"]) == 2 * 7
    assert len(settings["block_order"]) == 2 * len(settings["ranks"])
    assert "perplexity_curve" not in settings  # no heldout.txt beside this model
    with safe_open(str(out / "model.safetensors"), framework="pt") as file:
        assert file.get_slice("model.layers.1.mlp.down_proj.bitstack_signs").get_shape() == [3, 64, 16]
        assert "lm_head.qweight" in file.keys()  # the untied head in w8, as the other formats
    assert main([*common, "--num-blocks", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--num-blocks must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--rank", "sixteen", "--out", str(tmp_path / "o")])
