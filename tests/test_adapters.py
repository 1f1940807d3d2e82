"""Adapter layers on tiny models: each type's forward against its formula, QAT, checkpointing, bad input."""

from __future__ import annotations

import pytest
import torch

from rotaq.adapters.config import AdapterConfig, resolve_targets
from rotaq.adapters.layers import AdaptedLinear
from rotaq.adapters.structure import install_adapters, mark_only_adapters_trainable, set_fake_quantization
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import decoder_layers, family_for_model
from rotaq.rotations.rotate import RotationConfig, rotate_model
from tests.test_finetune_helpers import max_relative_error, one_torch_thread, randomize_adapters  # noqa: F401
from tests.tiny_models import random_tokens, tiny_model

LAYERS = 4
PRE_NUM = {"lora": 0, "reslora-is": 1, "reslora-bs": 2, "reslora-ms": 2}


def adapted_model(kind: str, name: str = "llama-untied", rotated: bool = True,
                  rotation: RotationConfig = RotationConfig(), **config_values) -> torch.nn.Module:
    model = tiny_model(name, num_hidden_layers=LAYERS)
    family = family_for_model(model)
    if rotated:
        rotate_model(model, family, rotation)
    config = AdapterConfig(kind, resolve_targets(None, family), rank=4, alpha=8.0, pre_num=PRE_NUM[kind],
                           **config_values)
    install_adapters(model, family, config, seed=0)
    return model


def reference_output(kind: str, x: dict[int, torch.Tensor], linears: list[AdaptedLinear], n: int) -> torch.Tensor:
    """h_n written out from the issue's formulas, in float64, from the recorded matmul inputs x."""
    A = [linear.adapter.lora_A.detach().double() for linear in linears]
    B = [linear.adapter.lora_B.detach().double() for linear in linears]
    linear, s, m = linears[n], linears[n].scaling, PRE_NUM[kind]
    base = x[n] @ linear.weight.detach().double().T
    if linear.bias is not None:
        base = base + linear.bias.detach().double()
    if kind == "lora":
        update = x[n] @ A[n].T @ B[n].T
    elif kind == "reslora-is":
        update = (x[n] + (x[n - 1] if n >= 1 else 0)) @ A[n].T @ B[n].T
    elif kind == "reslora-bs":
        update = x[n] @ sum(B[n - k] @ A[n - k] for k in range(m + 1) if n - k >= 0).T
    else:
        update = (x[n] @ A[n].T + sum(x[n - k] @ A[n - k].T for k in range(1, m + 1) if n - k >= 0)) @ B[n].T
    return base + s * update


@pytest.mark.parametrize("name", ["llama-untied", "qwen2-bias"])
@pytest.mark.parametrize("kind", list(PRE_NUM))
def test_forward_matches_the_formula(kind: str, name: str) -> None:
    model = adapted_model(kind, name)
    randomize_adapters(model)
    family = family_for_model(model)
    layers = decoder_layers(model, family)
    inputs: dict[tuple[str, int], torch.Tensor] = {}
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    for n, layer in enumerate(layers):
        for path in family.decoder_linears:
            module = layer.get_submodule(path)

            def keep_input(module, args, key=(path, n)):
                # The rotated matmul input, rebuilt from the dense rotation rather than the module's own code path.
                x = args[0].detach().double()
                inputs[key] = x if module.input_rotation is None else x @ module.input_rotation.matrix()

            module.register_forward_pre_hook(keep_input)
            module.register_forward_hook(lambda module, args, out, key=(path, n): outputs.__setitem__(key, out))
    with torch.no_grad():
        model(input_ids=random_tokens())
    for path in family.decoder_linears:
        linears = [layer.get_submodule(path) for layer in layers]
        x = {n: inputs[(path, n)] for n in range(LAYERS)}
        for n in range(LAYERS):
            assert max_relative_error(outputs[(path, n)], reference_output(kind, x, linears, n)) < 1e-5, (path, n)


@pytest.mark.parametrize("kind", list(PRE_NUM))
def test_zero_initialised_b_leaves_the_model_unchanged(kind: str) -> None:
    base = tiny_model("llama-untied", num_hidden_layers=LAYERS)
    rotate_model(base, family_for_model(base), RotationConfig())
    tokens = random_tokens()
    with torch.no_grad():
        assert torch.equal(adapted_model(kind)(input_ids=tokens).logits, base(input_ids=tokens).logits)


def test_online_rotated_projections_keep_their_rotation() -> None:
    model = adapted_model("lora", rotation=RotationConfig(o_proj_rotation="online"))
    layer = decoder_layers(model, family_for_model(model))[0]
    assert layer.self_attn.o_proj.input_rotation is not None and layer.mlp.down_proj.input_rotation is not None
    assert layer.self_attn.q_proj.input_rotation is None


@pytest.mark.parametrize("kind", ["lora", "reslora-bs", "reslora-ms"])
def test_qat_changes_the_forward_and_trains_a_and_b(kind: str) -> None:
    model = adapted_model(kind, qat="w4a4")
    randomize_adapters(model)
    parameters = mark_only_adapters_trainable(model)
    tokens = random_tokens()
    quantized = model(input_ids=tokens, labels=tokens)
    quantized.loss.backward()
    with torch.no_grad():
        set_fake_quantization(model, None)
        float_logits = model(input_ids=tokens).logits
    assert max_relative_error(quantized.logits, float_logits) > 1e-3
    for parameter in parameters:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


def gradients(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    parameters = mark_only_adapters_trainable(model)
    model.train()
    model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    grads = [p.grad.clone() for p in parameters]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("kind", ["reslora-is", "reslora-bs", "reslora-ms"])
def test_non_reentrant_checkpointing_gives_the_same_gradients(kind: str) -> None:
    model = adapted_model(kind)
    randomize_adapters(model)
    tokens = random_tokens()
    plain = gradients(model, tokens)
    model.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed = gradients(model, tokens)
    for expected, actual in zip(plain, checkpointed):
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["reslora-is", "reslora-ms"])
def test_reentrant_checkpointing_is_refused_for_shortcuts(kind: str) -> None:
    model = adapted_model(kind)
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(RotaqError, match="non-reentrant"):
        gradients(model, random_tokens())


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(kind="dora"), "unknown adapter 'dora'"),
        (dict(kind="lora", rank=0), "--rank must be at least 1"),
        (dict(kind="lora", pre_num=2), "--pre-num applies to"),
        (dict(kind="reslora-ms", pre_num=0), "--pre-num must be at least 1"),
        (dict(kind="lora", dropout=0.1, qat="w4a4"), "--dropout cannot be combined with --qat"),
    ],
)
def test_bad_adapter_config_is_refused(values: dict, message: str) -> None:
    with pytest.raises(RotaqError, match=message):
        AdapterConfig(**{"targets": ("self_attn.q_proj",), **values})


def test_targets_accept_short_and_full_names_and_refuse_unknown_ones() -> None:
    family = family_for_model(tiny_model("llama-untied"))
    assert resolve_targets("v_proj,self_attn.q_proj", family) == ("self_attn.q_proj", "self_attn.v_proj")
    with pytest.raises(RotaqError, match="unknown adapter target 'w_proj'"):
        resolve_targets("q_proj,w_proj", family)


def test_rank_wider_than_a_projection_is_refused_before_any_change() -> None:
    model = tiny_model("llama-untied")
    family = family_for_model(model)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(RotaqError, match="--rank 49 is larger than the width of self_attn.q_proj"):
        install_adapters(model, family, AdapterConfig("lora", ("self_attn.q_proj",), rank=49))
    assert {name: type(module) for name, module in model.named_modules()} == before


def test_bad_qat_scheme_and_second_install_are_refused() -> None:
    model = tiny_model("llama-untied")
    family = family_for_model(model)
    with pytest.raises(RotaqError, match="unknown quantization scheme"):
        install_adapters(model, family, AdapterConfig("lora", family.decoder_linears, rank=4, qat="w3a3"))
    install_adapters(model, family, AdapterConfig("lora", family.decoder_linears, rank=4))
    with pytest.raises(RotaqError, match="already has adapters"):
        install_adapters(model, family, AdapterConfig("lora", family.decoder_linears, rank=4))


def test_qat_clips_activations_as_the_deployment_will() -> None:
    from rotaq.adapters.qat import FakeQuantizers
    from rotaq.quantizers.activations import fake_quantize_activations

    inputs = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    inputs[0, 3] = 40.0  # an outlier that clipping cuts
    clipped = FakeQuantizers("w4a4", act_clip_ratio=0.9)
    assert clipped.scheme.act_clip_ratio == 0.9
    assert torch.equal(clipped.activations(inputs), fake_quantize_activations(inputs, 4, True, 0.9, None))
    assert not torch.equal(clipped.activations(inputs), FakeQuantizers("w4a4").activations(inputs))
    # per-block A8 follows ONNX Runtime's unclipped kernel, so the clip does not apply there
    assert FakeQuantizers("w4a8", act_clip_ratio=0.9).scheme == FakeQuantizers("w4a8").scheme
