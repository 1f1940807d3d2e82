"""Every stage option is declared once, on its Options dataclass, and both front ends reach it.

For each setting of each stage's Options class: `rotaq <stage> --flag VALUE` and `rotaq run --set
section.key=VALUE` must both arrive in the Options object the stage function is called with. A field that is
no setting must be wiring the caller supplies (listed below), so a new option cannot be added to one front end
only.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rotaq.pipeline.cli import main
from rotaq.pipeline.run.config_loading import load_run_config
from rotaq.pipeline.options import Option, allowed_values, is_setting, options_of, without_none, yaml_value
from rotaq.pipeline.run.stage_registry import STAGES, StageCall


@dataclass(frozen=True)
class StageOptions:
    stage: str  # the name in pipeline.run.stage_registry.STAGES, which is also its config section
    module: str
    options_class: str
    function: str
    command: tuple[str, ...] | None  # the CLI command with its required wiring arguments; None: not generated
    wiring: tuple[str, ...]  # fields the caller supplies, not user options
    section: str | None = None  # the config section, when it is not the stage's name


STAGE_OPTIONS = (
    StageOptions("rotate", "rotaq.rotations.stage", "RotateOptions", "run_rotate", ("rotate",),
                 ("model", "out", "calibration", "checkpoint", "progress")),
    StageOptions("finetune", "rotaq.adapters.finetune", "FinetuneOptions", "run_finetune", ("finetune",),
                 ("model", "out", "training", "data", "seq_len", "resume", "checkpoint_dir", "progress")),
    StageOptions("merge", "rotaq.adapters.merge_stage", "MergeOptions", "run_merge", ("merge",),
                 ("model", "out", "data", "seq_len")),
    StageOptions("quantize", "rotaq.quantizers.stage", "QuantizeOptions", "run_quantize", ("quantize",),
                 ("model", "out", "calibration", "progress")),
    StageOptions("export", "rotaq.export.stage", "ExportOptions", "run_export", None, ("model", "out", "progress")),
    StageOptions("bench", "rotaq.export.bench", "BenchOptions", "run_bench", None,
                 ("models", "out", "reference", "evaluation", "progress", "extra_fields")),
    StageOptions("evaluate", "rotaq.eval.commands", "EvalOptions", "run_eval", ("eval",),
                 ("model", "data", "reference", "progress"), section="eval"),
)
CLI_NOT_GENERATED = {"export", "bench"}
"""export/commands.py still builds ExportOptions / BenchOptions by hand (it is being reworked); their config
sections are generated, and this set may only shrink."""

# Settings whose config key is elsewhere in the run config: (key, other --set needed for it to apply).
CONFIG_KEYS = {("finetune", "qat_act_clip_ratio"): ("quantize.act_clip_ratio", ("finetune.qat=w4a4",)),
               ("quantize", "scheme"): ("quantize.schemes", ())}
# Values that cannot be derived from the type and constraints alone.
SAMPLES = {"targets": "q_proj,v_proj", "qat": "w8a8", "scheme": "w8a8", "device": "cuda"}


def options_class(entry: StageOptions) -> type:
    return getattr(importlib.import_module(entry.module), entry.options_class)


def sample(option: Option) -> Any:
    """A valid value other than the default."""
    if option.name in SAMPLES:
        return SAMPLES[option.name]
    _, kind = without_none(option.annotation)
    choices = allowed_values(option.doc)
    if choices and typing.get_origin(kind) is tuple:
        return (choices[0],)
    if choices:
        return next(choice for choice in choices if choice != option.default)
    if kind is bool:
        return not option.default
    if kind is int:
        return max(option.default or 0, int(option.doc.minimum or 0)) + 3
    if kind is float:
        return 0.5
    return (96,)  # tuple[int, ...]: prompt lengths


def received(options: Any, option: Option) -> Any:
    """The option's value in a built Options object, nested option classes included."""
    if type(options) is option.owner:
        return getattr(options, option.name)
    nested = [value for value in vars(options).values() if type(value) is option.owner]
    return getattr(nested[0], option.name)


class Called(Exception):
    def __init__(self, options: Any) -> None:
        super().__init__("stage called")
        self.options = options


def raise_called(options: Any) -> None:
    raise Called(options)


CASES = [(entry, option) for entry in STAGE_OPTIONS for option in options_of(options_class(entry))]


def case_id(case: tuple[StageOptions, Option]) -> str:
    return f"{case[0].stage}.{case[1].name}"


@pytest.mark.parametrize("entry", STAGE_OPTIONS, ids=lambda entry: entry.stage)
def test_every_field_is_a_setting_or_declared_wiring(entry: StageOptions) -> None:
    cls = options_class(entry)
    unexplained = [item.name for item in dataclasses.fields(cls) if not is_setting(item) and item.name not in
                   entry.wiring]
    assert not unexplained, (f"{cls.__name__}: declare {unexplained} with rotaq.pipeline.options.setting() so the "
                             f"CLI and the run config both get it, or list it as wiring here")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_run_config_reaches_the_option(case: tuple[StageOptions, Option], tmp_path: Path) -> None:
    entry, option = case
    value = sample(option)
    key, also = CONFIG_KEYS.get((entry.stage, option.name), (f"{entry.section or entry.stage}.{option.name}", ()))
    typed = [value] if key == "quantize.schemes" else value
    config = load_run_config(None, [f"{key}={yaml_value(typed)}", *also])
    definition = STAGES[entry.stage]
    branch = config.quantize.schemes[0] if entry.stage == "quantize" else None
    api = types.SimpleNamespace(**{entry.options_class: options_class(entry), entry.function: raise_called})
    call = StageCall(options=definition.options(config, branch), inputs={"model": "m", "model-float": "f"},
                     output=tmp_path / "out", run_folder=tmp_path, scratch=tmp_path / "scratch", show_progress=False)
    with pytest.raises(Called) as called:
        definition.invoke(api, call)
    assert received(called.value.options, option) == value


@pytest.mark.parametrize("case", [case for case in CASES if case[0].command], ids=case_id)
def test_command_line_reaches_the_option(case: tuple[StageOptions, Option], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    entry, option = case
    value = sample(option)
    monkeypatch.setattr(importlib.import_module(entry.module), entry.function, raise_called)
    out = [] if entry.stage == "evaluate" else ["--out", str(tmp_path / "out")]
    if isinstance(value, bool):
        flag = [option.flag]
    else:
        flag = [option.flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    with pytest.raises(Called) as called:
        main([*entry.command, "--model", "m", *out, *flag])
    assert received(called.value.options, option) == value


def test_only_the_export_commands_are_hand_written() -> None:
    assert {entry.stage for entry in STAGE_OPTIONS if entry.command is None} == CLI_NOT_GENERATED


def test_run_level_keys_reach_the_stages_data(tmp_path: Path) -> None:
    """data, seq_len and the token budgets become each stage's DataSpec or window settings."""
    config = load_run_config(None, ["data=corpus.txt", "seq_len=64", "quantize.calibration_tokens=640",
                                    "eval.max_tokens=320"])
    seen = {}
    for stage, function, name in (("finetune", "run_finetune", "FinetuneOptions"),
                                  ("merge", "run_merge", "MergeOptions"),
                                  ("quantize", "run_quantize", "QuantizeOptions"),
                                  ("bench", "run_bench", "BenchOptions"),
                                  ("evaluate", "run_eval", "EvalOptions")):
        entry = next(entry for entry in STAGE_OPTIONS if entry.stage == stage)
        api = types.SimpleNamespace(**{name: options_class(entry), function: raise_called})
        definition = STAGES[stage]
        call = StageCall(options=definition.options(config, "w4a4"), inputs={"model": "m"}, output=tmp_path / "o",
                         run_folder=tmp_path, scratch=tmp_path / "s", show_progress=False)
        with pytest.raises(Called) as called:
            definition.invoke(api, call)
        seen[stage] = called.value.options
    assert (seen["finetune"].data, seen["finetune"].seq_len) == ("corpus.txt", 64)
    assert (seen["merge"].data, seen["merge"].seq_len) == ("corpus.txt", 64)
    assert seen["quantize"].calibration.max_tokens == 640 and seen["quantize"].calibration.seq_len == 64
    assert seen["bench"].evaluation.max_tokens == 320 and seen["evaluate"].data.max_tokens == 320


def test_renamed_keys_still_load_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    config = load_run_config(None, ["rotate.kind=random", "bench.peer=null"])
    assert config.rotate.rotation == "random" and config.bench.peers == ()
    assert "rotate.kind is now called rotate.rotation" in caplog.text


def test_bad_command_line_value_is_one_line_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["finetune", "--model", "m", "--out", "o", "--dropout", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "rotaq: error: --dropout: must be in [0, 1), got 1.5"


def test_ragged_w4a16_g128_is_a_valid_run() -> None:
    config = load_run_config(None, ["quantize.ragged_groups=true", "quantize.schemes=[w4a16-g128]"])
    options = STAGES["quantize"].options(config, "w4a16-g128")
    assert options["scheme"] == "w4a16-g128" and options["ragged_groups"] is True
