"""The finetune stage on a tiny rotated model: training, folder format, checkpoints, resume, NaN, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rotaq.adapters.train
from rotaq.adapters.config import AdapterConfig
from rotaq.adapters.finetune import ADAPTERS_FILE, TRAINING_LOG_FILE, run_finetune
from rotaq.adapters.layers import AdaptedLinear
from rotaq.adapters.structure import install_adapters, load_adapter_state
from rotaq.pipeline.artifacts import WEIGHTS_NAME, read_manifest
from rotaq.pipeline.cli import main
from rotaq.pipeline.errors import NonFiniteError, RotaqError
from rotaq.pipeline.loading import load_model
from tests.test_finetune_helpers import (  # noqa: F401 (one_torch_thread is an autouse fixture)
    SEQ_LEN,
    finetune_options,
    one_torch_thread,
    rotated_three_layer_folder,
)
from tests.tiny_models import random_tokens


@pytest.fixture(scope="module")
def rotated(tiny_hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rotated_three_layer_folder(tiny_hf_folder, tmp_path_factory.mktemp("finetune"))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTERS_FILE))


def test_training_lowers_the_loss(rotated: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = run_finetune(finetune_options(rotated, tmp_path / "out", tiny_text_file, adapter="reslora-is",
                                        training={"steps": 10, "gradient_checkpointing": True}))
    log = json.loads((out / TRAINING_LOG_FILE).read_text())
    losses = [step["loss"] for step in log["steps"]]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert log["evaluations"][-1]["perplexity"] < log["evaluations"][0]["perplexity"]
    assert log["tokens_per_s"] > 0 and log["wall_time_s"] > 0 and log["processes"] == 1


@pytest.mark.parametrize("kind", ["lora", "reslora-ms"])
def test_folder_keeps_the_base_weights_and_reloads_the_adapted_model(rotated: Path, tiny_text_file: Path,
                                                                     tmp_path: Path, kind: str) -> None:
    out = run_finetune(finetune_options(rotated, tmp_path / "out", tiny_text_file, adapter=kind))
    manifest = read_manifest(out)
    section = manifest["adapters"]
    assert manifest["stage"] == "finetune" and manifest["rotation"] == read_manifest(rotated)["rotation"]
    assert section["type"] == kind and section["rank"] == 4 and len(section["targets"]) == 7
    assert (section["input_norm_ratios"] is not None) == (kind == "reslora-ms")

    parent_tensors, folder_tensors = load_file(str(rotated / WEIGHTS_NAME)), load_file(str(out / WEIGHTS_NAME))
    adapters_only = adapter_tensors(out)
    assert set(folder_tensors) == set(parent_tensors) | set(adapters_only)
    assert section["trainable_parameters"] == sum(tensor.numel() for tensor in adapters_only.values())
    assert all(torch.equal(folder_tensors[name], tensor) for name, tensor in parent_tensors.items())

    # The adapted function rebuilt by hand: the parent model plus the adapters file.
    expected = load_model(str(rotated))
    install_adapters(expected.model, expected.family, AdapterConfig.from_section(section))
    load_adapter_state(expected.model, adapters_only)
    reloaded = load_model(str(out)).model
    assert any(isinstance(m, AdaptedLinear) for m in reloaded.modules())
    tokens = random_tokens(length=SEQ_LEN)
    with torch.no_grad():
        logits = reloaded(input_ids=tokens).logits
        assert torch.equal(logits, expected.model(input_ids=tokens).logits)
        assert not torch.equal(logits, load_model(str(rotated)).model(input_ids=tokens).logits)


def test_norm_ratios_cover_every_shortcut(rotated: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = run_finetune(finetune_options(rotated, tmp_path / "out", tiny_text_file, adapter="reslora-ms", pre_num=2,
                                        training={"steps": 2}))
    ratios = read_manifest(out)["adapters"]["input_norm_ratios"]
    assert set(ratios) == set(read_manifest(out)["adapters"]["targets"])
    for per_layer in ratios.values():
        assert [len(r) for r in per_layer] == [0, 1, 2]
        assert all(0 < alpha < 100 for r in per_layer for alpha in r)


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int, error: BaseException | None) -> None:
    """Make the loss of optimizer step `step` NaN (error None) or raise `error` there."""
    real_loss = rotaq.adapters.train.causal_lm_loss
    calls = {"count": 0}

    def loss(model, input_ids):
        calls["count"] += 1
        value = real_loss(model, input_ids)
        if calls["count"] == step:
            if error is not None:
                raise error
            return value * float("nan")
        return value

    monkeypatch.setattr(rotaq.adapters.train, "causal_lm_loss", loss)


def test_resume_gives_the_weights_of_an_uninterrupted_run(rotated: Path, tiny_text_file: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Dropout makes the result depend on the restored RNG state too.
    uninterrupted = run_finetune(finetune_options(rotated, tmp_path / "a", tiny_text_file, dropout=0.1))
    options = finetune_options(rotated, tmp_path / "b", tiny_text_file, dropout=0.1)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 5, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run_finetune(options)
    assert [p.name for p in options.checkpoint_folder.glob("step-*")] == ["step-00000004"]
    resumed = run_finetune(finetune_options(rotated, tmp_path / "b", tiny_text_file, dropout=0.1, resume=True))
    expected, actual = adapter_tensors(uninterrupted), adapter_tensors(resumed)
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())
    log = json.loads((resumed / TRAINING_LOG_FILE).read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(rotated: Path, tiny_text_file: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    options = finetune_options(rotated, tmp_path / "out", tiny_text_file)
    interrupt_at_step(monkeypatch, 4, None)
    with pytest.raises(NonFiniteError, match=r"loss became nan at step 4.*step-00000002 .*is kept"):
        run_finetune(options)
    checkpoint = options.checkpoint_folder / "step-00000002"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / ADAPTERS_FILE)).values())
    assert not options.out.exists()


def test_resume_under_other_settings_is_refused_and_changes_nothing(rotated: Path, tiny_text_file: Path,
                                                                   tmp_path: Path) -> None:
    run_finetune(finetune_options(rotated, tmp_path / "out", tiny_text_file, training={"steps": 2}))
    folder = tmp_path / "out.checkpoints"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    with pytest.raises(RotaqError, match=r"different settings \(training.lr: 0.01 → 0.02\)"):
        run_finetune(finetune_options(rotated, tmp_path / "out", tiny_text_file, resume=True,
                                      training={"steps": 2, "lr": 0.02}))
    with pytest.raises(RotaqError, match="pass --resume to continue"):
        run_finetune(finetune_options(rotated, tmp_path / "out", tiny_text_file, training={"steps": 2}))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "dora"], "--adapter: 'dora' is not one of lora, reslora"),
        (["--targets", "q_proj,w_proj"], "unknown adapter target 'w_proj'"),
        (["--rank", "500"], "--rank 500 is larger than the width"),
        (["--qat", "w3a3"], "unknown quantization scheme"),
    ],
)
def test_bad_finetune_input_is_one_line_error(capsys: pytest.CaptureFixture, rotated: Path, tiny_text_file: Path,
                                              tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(rotated), "--data", str(tiny_text_file), "--seq-len", str(SEQ_LEN),
                 "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not Path(f"{out}.checkpoints").exists()


def test_two_processes_train_identical_adapters(rotated: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    """Data-parallel on CPU: torchrun starts two gloo processes, accelerate averages their gradients."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rotaq.pipeline.cli", "finetune", "--model", str(rotated), "--adapter", "reslora-ms",
               "--data", str(tiny_text_file), "--seq-len", str(SEQ_LEN), "--rank", "4", "--steps", "3",
               "--batch-size", "2", "--grad-accum", "2", "--lr", "0.01", "--eval-every", "0", "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    log = json.loads((out / TRAINING_LOG_FILE).read_text())
    digests = log["process_adapter_sha256"]
    assert log["processes"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert log["train_tokens"] == 3 * 2 * 2 * SEQ_LEN * 2
    assert any(t.abs().sum() > 0 for name, t in adapter_tensors(out).items() if "lora_B" in name)
