"""The `rotaq run` configuration: every problem names its key, --set is typed like YAML, init round-trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rotaq.pipeline.cli import main
from rotaq.pipeline.run.config_loading import ConfigError, config_from_mapping, key_paths, load_run_config
from rotaq.pipeline.run.config import RunConfig


def config_problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(raw)
    return str(caught.value).splitlines()[1:]


def test_unknown_key_is_named_with_the_closest_valid_key() -> None:
    assert config_problems({"quantize": {"weigths": "rtn"}}) == [
        "  quantize.weigths: unknown key; did you mean quantize.weights?"]
    assert config_problems({"quantise": {}}) == ["  quantise: unknown key; did you mean quantize?"]


def test_key_in_the_wrong_section_points_to_its_section() -> None:
    assert config_problems({"rotate": {"weights": "rtn"}}) == [
        "  rotate.weights: unknown key; did you mean quantize.weights?"]


def test_wrong_types_name_the_key_and_the_expected_type() -> None:
    problems = config_problems({"rotate": {"seed": "abc"}, "quantize": {"act_order": "yes please"},
                                "eval": {"max_tokens": 2.5}, "finetune": []})
    assert problems == ["  rotate.seed: expected an integer, got 'abc' (a string)",
                        "  finetune: expected a mapping of keys, got a list",
                        "  quantize.act_order: expected true or false, got 'yes please' (a string)",
                        "  eval.max_tokens: expected an integer, got 2.5 (a number)"]


def test_bad_values_name_the_key() -> None:
    problems = config_problems({"rotate": {"kind": "haar"}, "seq_len": 1,
                                "quantize": {"schemes": ["w4a4", "w3a3"], "weights": "awq", "group": 0,
                                             "act_clip_ratio": 1.5}})
    assert [line.split(":")[0].strip() for line in problems] == [
        "seq_len", "rotate.rotation", "quantize.schemes", "quantize.weights", "quantize.group", "quantize.act_clip_ratio"]
    assert "'haar' is not one of hadamard, random" in problems[1]
    assert "w3a3" in problems[2] and "'awq' is not one of rtn, gptq" in problems[3]


def test_token_budgets_must_hold_one_window() -> None:
    assert config_problems({"seq_len": 64, "eval": {"max_tokens": 32}}) == [
        "  eval.max_tokens: 32 tokens do not fill one window of seq_len = 64"]


def test_set_overrides_are_typed_as_yaml_and_win_over_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "rotaq.yaml"
    config_file.write_text("quantize:\n  weights: gptq\n  group: 64\nrotate:\n  seed: 3\n")
    config = load_run_config(config_file, ["quantize.weights=rtn", "quantize.group=null", "rotate.seed=7",
                                           "quantize.schemes=[w8a8, w4a16-g128]", "finetune.lr=1e-4",
                                           "rotate.enabled=false", "export.check_tokens=16"])
    assert config.quantize.weights == "rtn" and config.quantize.group is None
    assert config.rotate.seed == 7 and config.rotate.enabled is False
    assert config.quantize.schemes == ("w8a8", "w4a16-g128")
    assert config.finetune.lr == pytest.approx(1e-4) and config.export.check_tokens == 16
    assert load_run_config(None, ["quantize.schemes=w8a8"]).quantize.schemes == ("w8a8",)


@pytest.mark.parametrize("override, message", [
    ("quantize.weights", "--set expects KEY.PATH=VALUE"),
    ("quantize.weigths=rtn", "quantize.weigths: unknown key; did you mean quantize.weights?"),
    ("seq_len.tokens=3", "seq_len: expected an integer, got {'tokens': 3} (a mapping)"),
    ("rotate.seed=three", "rotate.seed: expected an integer, got 'three'"),
])
def test_bad_overrides_are_reported_with_their_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, [override])


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    config_file = tmp_path / "rotaq.yaml"
    config_file.write_text("quantize:\n  schemes: [w4a4\nrotate:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_run_config(config_file)


def test_init_writes_a_commented_file_that_reads_back_as_the_defaults(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    config_file = tmp_path / "rotaq.yaml"
    assert main(["init", "--out", str(config_file)]) == 0
    assert load_run_config(config_file) == RunConfig()
    lines = config_file.read_text().splitlines()
    for path in key_paths():
        name = path.rpartition(".")[2]
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")
                     and (line.startswith("  ") == ("." in path)))
        assert lines[index - 1].lstrip().startswith("#"), f"{path} has no comment"
    assert main(["init", "--out", str(config_file)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_run_help_documents_every_key(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    assert "rotaq init" in help_text
    for path in key_paths():
        assert f"  {path} (" in help_text
