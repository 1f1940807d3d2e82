"""Learned rotations: orthogonal iterates, a lower quantized loss, exact resume, NaN stop, one-line errors.

Exactness of the folded learned rotation on every family is in tests/test_rotation.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rotaq.pipeline.cli import main
from rotaq.pipeline.artifacts import read_manifest
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import family_for_model
from rotaq.quantizers.schemes import parse_scheme
from rotaq.rotations.learn_checkpoint import RotationCheckpoint
from rotaq.rotations.learn_stage import start_rotations
from rotaq.rotations.learned import LearnableRotations, LearnSettings, learn_rotations, rotation_optimizer
from rotaq.rotations.rotate import RotationConfig, RotationMatrices, online_rotation_specs
from rotaq.rotations.stage import RotateOptions, run_rotate
from tests.tiny_models import TINY_CONFIGS, random_tokens, tiny_model

W4A4 = parse_scheme("w4a4")


def orthogonality_error(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.T @ matrix - torch.eye(matrix.shape[0], dtype=matrix.dtype)))


def test_optimizer_iterates_stay_orthogonal() -> None:
    """Hundreds of Cayley steps towards a far-away rotation: RᵀR stays I to 1e-5, and R does get there."""
    generator = torch.Generator().manual_seed(0)
    target = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))[0]
    head_target = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))[0]
    rotations = LearnableRotations(RotationMatrices(torch.eye(48, dtype=torch.float64),
                                                    [torch.eye(12, dtype=torch.float64)]))
    optimizer = rotation_optimizer(rotations, lr=0.1)
    for _ in range(300):
        loss = (rotations.residual - target).pow(2).sum() + (rotations.heads[0] - head_target).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    residual, head = rotations.residual.detach(), rotations.heads[0].detach()
    assert orthogonality_error(residual) < 1e-5 and orthogonality_error(head) < 1e-5
    # det(target) may be -1, out of reach of a rotation path from I: compare with the start distance instead.
    assert float((residual - target).norm()) < 0.5 * float((torch.eye(48, dtype=torch.float64) - target).norm())


def _learn(model: torch.nn.Module, steps: int, checkpoint: RotationCheckpoint | None = None,
           windows: torch.Tensor | None = None, lr: float = 0.05):
    family = family_for_model(model)
    config = RotationConfig(kind="learned", seed=3)
    settings = LearnSettings(W4A4, steps=steps, lr=lr, progress=False)
    windows = random_tokens(4, 16, seed=5) if windows is None else windows
    return learn_rotations(model, family, windows, settings, start_rotations(model, family, config, True),
                           online_rotation_specs(model, family, config), checkpoint)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = _learn(tiny_model("qwen2-bias"), steps=4)
    settings = {"run": "test"}
    _learn(tiny_model("qwen2-bias"), steps=2, checkpoint=RotationCheckpoint(tmp_path / "c.pt", settings))
    resumed = _learn(tiny_model("qwen2-bias"), steps=4, checkpoint=RotationCheckpoint(tmp_path / "c.pt", settings))
    assert resumed.log["resumed_at"] == 2 and resumed.log["steps"] == 4
    assert resumed.log["losses"] == straight.log["losses"]
    assert torch.equal(resumed.matrices.residual, straight.matrices.residual)
    assert all(torch.equal(a, b) for a, b in zip(resumed.matrices.heads, straight.matrices.heads))
    with pytest.raises(RotaqError, match="other settings.*run: test → other"):
        RotationCheckpoint(tmp_path / "c.pt", {"run": "other"}).load()


def test_nan_loss_stops_with_the_last_good_rotation() -> None:
    model = tiny_model("llama-tied")
    calls = {"count": 0}

    def poison_after_two_steps(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        calls["count"] += 1
        return output * float("nan") if calls["count"] > 2 else output

    model.lm_head.register_forward_hook(poison_after_two_steps)
    stopped = _learn(model, steps=5)  # the rotation after 2 steps gives NaN: the one after 1 step is kept
    assert stopped.log["steps"] == 1 and "nan after 2 steps; kept the rotation after 1" in stopped.log["stopped"]
    one_step = _learn(tiny_model("llama-tied"), steps=1)
    assert torch.equal(stopped.matrices.residual, one_step.matrices.residual)
    assert stopped.log["losses"] == one_step.log["losses"]


def test_width_without_hadamard_starts_from_a_random_rotation(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**TINY_CONFIGS["llama-untied"], "hidden_size": 70, "num_attention_heads": 5, "num_key_value_heads": 1}
    config = AutoConfig.for_model(values.pop("model_type"), vocab_size=96, num_hidden_layers=2, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with caplog.at_level(logging.WARNING):
        start = start_rotations(model, family_for_model(model), RotationConfig(kind="learned", seed=3), learn_heads=True)
    assert "no Hadamard matrix of order 70" in caplog.text
    assert orthogonality_error(start.residual) < 1e-10 and start.residual.abs().max() < 0.9  # not a ±1/√n matrix


@pytest.mark.parametrize("overrides, message", [
    ({"scheme": "w4a16"}, "needs a scheme that quantizes activations"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"calibration": DataSpec(max_tokens=0, seq_len=16)}, "not enough text"),
])
def test_bad_learning_input_is_one_line_error(tiny_hf_folder: Path, tiny_text_file: Path, tmp_path: Path,
                                              overrides: dict, message: str) -> None:
    options = {"steps": 2, "calibration": DataSpec(source=str(tiny_text_file), seq_len=16, max_tokens=64), **overrides}
    with pytest.raises(RotaqError, match=message) as error:
        run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path / "out", rotation="learned", **options))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_empty_calibration_text_is_refused(tiny_hf_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(RotaqError, match="contains no text"):
        run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path / "out", rotation="learned", steps=2,
                                 calibration=DataSpec(source=str(empty), seq_len=16)))


def test_rotate_command_learns_and_folds(tiny_hf_folder: Path, tiny_text_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "learned"
    code = main(["rotate", "--model", str(tiny_hf_folder), "--out", str(out), "--rotation", "learned",
                 "--steps", "3", "--lr", "0.05", "--calib", str(tiny_text_file), "--seq-len", "16",
                 "--max-tokens", "64"])
    assert code == 0 and "learned in 3 steps" in capsys.readouterr().out
    rotation = read_manifest(out)["rotation"]
    assert rotation["kind"] == "learned" and rotation["head_rotations"]
    assert rotation["learned"]["steps"] == 3 and rotation["learned"]["calibration_windows"] == 4
    assert rotation["check"]["max_relative_logit_error"] < 1e-4
    assert not Path(f"{out}.rotation-checkpoint.pt").exists()

    code = main(["rotate", "--model", str(tiny_hf_folder), "--out", str(tmp_path / "bad"), "--rotation", "learned",
                 "--scheme", "w4a16"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("rotaq: error:")


def _start_and_its_fold(name: str):
    """A tiny model, the start rotation of its learning, the online rotations, and a copy with them folded."""
    import copy

    from rotaq.rotations.rotate import rotate_model

    model = tiny_model(name)
    family = family_for_model(model)
    config = RotationConfig(kind="learned", seed=3)
    start = start_rotations(model, family, config, True)
    deployed = copy.deepcopy(model)
    rotate_model(deployed, family, config, start)
    return model, family, start, online_rotation_specs(model, family, config), deployed


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_learning_loss_is_the_deployed_models_loss(name: str) -> None:
    """What is learned is what is deployed: the learning view's loss at the start rotation equals the loss of
    the folded model quantized by the quantize stage (RTN without clip search, float lm_head, as learned)."""
    import dataclasses

    from rotaq.quantizers.quantize_model import QuantizeSettings, quantize_model
    from rotaq.rotations.learned import LearnableRotations, learning_view, prepare_for_learning

    scheme = dataclasses.replace(W4A4, act_clip_ratio=0.9, weight_clip_search=False, lm_head_bits=None)
    model, family, start, online, deployed = _start_and_its_fold(name)
    tokens = random_tokens(2, 16, seed=4)
    quantize_model(deployed, family, QuantizeSettings(scheme=scheme, weights="rtn", progress=False), None)
    prepare_for_learning(model, family)
    with torch.no_grad(), learning_view(model, family, LearnableRotations(start), scheme, online, weights="rtn"):
        learned_loss = float(model(input_ids=tokens, labels=tokens).loss)
    with torch.no_grad():
        deployed_loss = float(deployed(input_ids=tokens, labels=tokens).loss)
    assert learned_loss == pytest.approx(deployed_loss, rel=1e-4)  # dropping an online rotation: 3e-3


def _activation_quantized_forward(linear: torch.nn.Module, spec) -> None:
    """Make a deployed float linear quantize what reaches its matmul (after any online rotation) and no more."""
    from torch.nn import functional as F

    from rotaq.quantizers.activations import fake_quantize_activations

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if hasattr(linear, "matmul_input"):
            hidden_states = linear.matmul_input(hidden_states)
        hidden_states = fake_quantize_activations(hidden_states, spec.act_bits, spec.act_symmetric,
                                                  spec.act_clip_ratio, spec.act_block_size)
        return F.linear(hidden_states, linear.weight, linear.bias)

    linear.forward = forward


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-bias"])
def test_float_weight_learning_quantizes_activations_only(name: str) -> None:
    """--learn-weights float: the learning loss is the folded float model's with only its linears' inputs
    fake-quantized (as SpinQuant learns when GPTQ follows), and differs from the RTN-weight loss."""
    import dataclasses

    from rotaq.pipeline.families import decoder_layers
    from rotaq.quantizers.linear import decoder_layer_specs
    from rotaq.rotations.learned import LearnableRotations, learning_view, prepare_for_learning

    scheme = dataclasses.replace(W4A4, act_clip_ratio=0.9, lm_head_bits=None)
    model, family, start, online, deployed = _start_and_its_fold(name)
    tokens = random_tokens(2, 16, seed=4)
    specs = decoder_layer_specs(scheme, family, deployed)
    for layer in decoder_layers(deployed, family):
        for path in family.decoder_linears:
            _activation_quantized_forward(layer.get_submodule(path), specs[path])
    prepare_for_learning(model, family)
    rotations = LearnableRotations(start)
    with torch.no_grad():
        with learning_view(model, family, rotations, scheme, online, weights="float"):
            float_loss = float(model(input_ids=tokens, labels=tokens).loss)
        with learning_view(model, family, rotations, scheme, online, weights="rtn"):
            rtn_loss = float(model(input_ids=tokens, labels=tokens).loss)
        deployed_loss = float(deployed(input_ids=tokens, labels=tokens).loss)
    assert float_loss == pytest.approx(deployed_loss, rel=1e-4)
    assert abs(rtn_loss - float_loss) > 1e-3


def test_learn_weights_option_reaches_the_settings_and_is_checked() -> None:
    from rotaq.rotations.learn_stage import learn_settings

    options = RotateOptions(model=None, out=Path("unused"), rotation="learned", learn_weights="float")
    settings = learn_settings(options)
    assert settings.weights == "float" and settings.trajectory()["weights"] == "float"
    with pytest.raises(RotaqError, match="--learn-weights"):
        LearnSettings(scheme=W4A4, weights="fp8")
