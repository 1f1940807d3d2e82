"""The command line: every stage listed, and bad input answered with one line and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rotaq.pipeline.cli import main


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_stage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("rotate", "eval", "outliers"):
        assert command in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["rotate", "--model", "/nonexistent/model.gguf", "--out", "x"], "GGUF file not found"),
        (["rotate", "--model", "./no/such/folder", "--out", "x"], "model not found"),
        (["eval", "--model", "/nonexistent", "--max-tokens", "10"], "model not found"),
    ],
)
def test_bad_model_is_one_line_error(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unsupported_family_names_the_supported_ones(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    code, _, err = run_cli(capsys, "rotate", "--model", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and "model type 'gpt2' is not supported" in err and "Qwen2" in err
    assert not (tmp_path / "out").exists()


def test_empty_data_is_one_line_error(capsys: pytest.CaptureFixture, tiny_hf_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_hf_folder), "--data", str(empty))
    assert code == 2 and "contains no text" in err


def test_rotate_then_eval_against_original(capsys: pytest.CaptureFixture, tiny_hf_folder: Path,
                                           tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "rotated"
    code, stdout, _ = run_cli(capsys, "rotate", "--model", str(tiny_hf_folder), "--out", str(out))
    assert code == 0 and "max relative error" in stdout
    code, stdout, _ = run_cli(capsys, "eval", "--model", str(out), "--reference", str(tiny_hf_folder),
                              "--data", str(tiny_text_file), "--seq-len", "32", "--json")
    result = json.loads(stdout)
    assert code == 0 and result["kl_divergence"] < 1e-8 and result["top1_agreement"] == 1.0

    code, stdout, _ = run_cli(capsys, "outliers", "--model", str(out), "--data", str(tiny_text_file),
                              "--seq-len", "32", "--out", str(tmp_path / "outliers"))
    assert code == 0 and "before" in stdout
    assert (tmp_path / "outliers" / "outliers.png").stat().st_size > 0
    rows = json.loads((tmp_path / "outliers" / "outliers.json").read_text())
    assert any(row["layer"].endswith("mlp.down_proj") for row in rows)
