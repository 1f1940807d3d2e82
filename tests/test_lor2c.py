"""LoR2C paths on a tiny model: zero-initialised paths change nothing, a path adds s·B·A·h_in where it
should, and the Share, Merge and Inject variants change the structure as the paper describes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rotaq.adapters.lor2c_config import (INJECT_LOR2C, LOR2C, LOR2C_TYPES, MERGE_LOR2C, SHARE_LOR2C, Lor2cConfig,
                                         lor2c_parameter_count)
from rotaq.adapters.lor2c_paths import LoraLinear, install_lor2c
from rotaq.adapters.lor2c_scores import path_score
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import family_for_model as family_for
from tests.tiny_models import tiny_model


def _model_and_ids() -> tuple[nn.Module, torch.Tensor]:
    model = tiny_model("llama-untied", num_hidden_layers=4).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, ids


def _randomize(parameter: nn.Parameter, seed: int) -> None:
    with torch.no_grad():
        parameter.copy_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("kind", LOR2C_TYPES)
def test_zero_initialised_paths_change_nothing(kind: str) -> None:
    model, ids = _model_and_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        install_lor2c(model, family_for(model), Lor2cConfig(kind=kind, rank=4))
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_a_path_adds_its_low_rank_product_of_the_layer_input_to_the_layer_output() -> None:
    model, ids = _model_and_ids()
    family = family_for(model)
    layers = model.get_submodule(family.layers)
    seen: dict[str, torch.Tensor] = {}
    layers[0].register_forward_pre_hook(lambda module, args, kwargs: seen.__setitem__("in", args[0] if args else
                                                                                        kwargs["hidden_states"]),
                                        with_kwargs=True)
    installed = install_lor2c(model, family, Lor2cConfig(rank=4, alpha=8.0))
    layers[0].register_forward_hook(lambda module, args, output: seen.__setitem__("out", output))  # after the path
    with torch.no_grad():
        model(input_ids=ids)
        plain_out = seen["out"]
        path = installed.paths[0]
        _randomize(path.lora_B, 0)
        model(input_ids=ids)
    expected = plain_out + 2.0 * (seen["in"] @ path.lora_A.T) @ path.lora_B.T
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)


def test_share_lor2c_has_one_a_and_counts_it_once() -> None:
    model, _ = _model_and_ids()
    config = Lor2cConfig(kind=SHARE_LOR2C, rank=4)
    installed = install_lor2c(model, family_for(model), config)
    assert len({id(path.lora_A) for path in installed.paths}) == 1
    assert len({id(path.lora_B) for path in installed.paths}) == len(installed.paths)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert installed.parameter_count() == lor2c_parameter_count(hidden, layers, config) == (1 + layers) * 4 * hidden
    assert lor2c_parameter_count(hidden, layers, Lor2cConfig(rank=4)) == 2 * layers * 4 * hidden


def test_merge_lor2c_replaces_the_weakest_adjacent_pair_and_trains_the_new_path() -> None:
    model, ids = _model_and_ids()
    installed = install_lor2c(model, family_for(model), Lor2cConfig(kind=MERGE_LOR2C, rank=4))
    count = len(installed.paths)
    for index, path in enumerate(installed.paths):  # path 1 and 2 carry the least: they merge
        _randomize(path.lora_B, index)
        with torch.no_grad():
            path.lora_B.mul_(0.01 if index in (1, 2) else 1.0)
    new_parameters = installed.merge_weakest_pair()
    assert len(installed.paths) == count - 1
    spans = [(path.first, path.last) for path in installed.paths]
    assert spans[1] == (1, 2) and spans[0] == (0, 0) and spans[2] == (3, 3)
    assert {id(p) for p in new_parameters} == {id(installed.paths[1].lora_A), id(installed.paths[1].lora_B)}
    model(input_ids=ids).logits.square().mean().backward()
    assert all(parameter.grad is not None for parameter in new_parameters)
    assert installed.paths[1].lora_B.grad.abs().sum() > 0


def test_inject_lor2c_puts_lora_where_the_strongest_path_was() -> None:
    model, ids = _model_and_ids()
    family = family_for(model)
    installed = install_lor2c(model, family, Lor2cConfig(kind=INJECT_LOR2C, rank=4))
    for index, path in enumerate(installed.paths):
        _randomize(path.lora_B, index)
        with torch.no_grad():
            path.lora_B.mul_(10.0 if index == 2 else 1.0)
    layer, added = installed.inject_lora()
    assert layer == 2 and 2 not in [path.first for path in installed.paths]
    decoder_layer = model.get_submodule(family.layers)[2]
    assert isinstance(decoder_layer.self_attn.q_proj, LoraLinear)
    assert isinstance(decoder_layer.self_attn.v_proj, LoraLinear)
    assert not isinstance(decoder_layer.self_attn.k_proj, LoraLinear)
    model(input_ids=ids).logits.square().mean().backward()
    assert len(added) == 4 and all(parameter.grad is not None for parameter in added)


def test_path_score_matches_the_singular_values_of_the_full_product() -> None:
    model, _ = _model_and_ids()
    config = Lor2cConfig(rank=4, alpha=8.0, score="top-share", top_k=2)
    path = install_lor2c(model, family_for(model), config).paths[0]
    _randomize(path.lora_B, 3)
    singular = torch.linalg.svdvals(path.delta().detach().double())[:4]
    assert path_score(path, config) == pytest.approx(float(singular[:2].sum() / singular.sum()), rel=1e-9)
    mean = Lor2cConfig(rank=4, alpha=8.0, score="mean")
    assert path_score(path, mean) == pytest.approx(float(singular.mean()), rel=1e-9)


def test_default_score_grows_with_the_update_and_top_share_does_not() -> None:
    """Why `mean` is the default: merge/inject must rank paths by how much update they carry."""
    model, _ = _model_and_ids()
    path = install_lor2c(model, family_for(model), Lor2cConfig(rank=4)).paths[0]
    _randomize(path.lora_B, 1)
    default, share = Lor2cConfig(rank=4), Lor2cConfig(rank=4, score="top-share")
    before = path_score(path, default), path_score(path, share)
    with torch.no_grad():
        path.lora_B.mul_(10.0)
    assert path_score(path, default) == pytest.approx(10 * before[0], rel=1e-6)  # B is float32
    assert path_score(path, share) == pytest.approx(before[1], rel=1e-6)


def test_removing_paths_restores_the_model() -> None:
    model, ids = _model_and_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    installed = install_lor2c(model, family_for(model), Lor2cConfig(kind=INJECT_LOR2C, rank=4))
    for index, path in enumerate(installed.paths):
        _randomize(path.lora_B, index)
    installed.inject_lora()
    installed.remove(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize(("options", "message"), [
    ({"kind": "lor3c"}, "unknown LoR2C type"), ({"rank": 0}, "rank must be at least 1"),
    ({"score": "max"}, "unknown path score"), ({"rank": 4, "top_k": 5}, "top_k must be in"),
])
def test_bad_lor2c_settings_are_refused(options: dict, message: str) -> None:
    with pytest.raises(RotaqError, match=message):
        Lor2cConfig(**options)


def test_a_model_takes_one_set_of_paths() -> None:
    model, _ = _model_and_ids()
    install_lor2c(model, family_for(model), Lor2cConfig(kind=LOR2C, rank=2))
    with pytest.raises(RotaqError, match="already has LoR2C paths"):
        install_lor2c(model, family_for(model), Lor2cConfig(kind=LOR2C, rank=2))


def test_dry_run_counts_match_the_installed_adapters() -> None:
    from rotaq.adapters.config import AdapterConfig
    from rotaq.adapters.parameter_counts import adapter_parameter_counts
    from rotaq.adapters.structure import install_adapters, mark_only_adapters_trainable

    model, _ = _model_and_ids()
    family = family_for(model)
    rows = adapter_parameter_counts(model, family, 4, merges=1, injections=1)
    counts = {row["adapter"]: row["trainable_parameters"] for row in rows}
    lora_model, _ = _model_and_ids()
    install_adapters(lora_model, family, AdapterConfig(kind="lora", targets=family.decoder_linears, rank=4))
    assert counts["lora"] == counts["reslora-bs"] == sum(p.numel() for p in mark_only_adapters_trainable(lora_model))
    for kind in LOR2C_TYPES:
        fresh, _ = _model_and_ids()
        installed = install_lor2c(fresh, family, Lor2cConfig(kind=kind, rank=4))
        if kind == MERGE_LOR2C:
            installed.merge_weakest_pair()
        if kind == INJECT_LOR2C:
            installed.inject_lora()
        assert installed.parameter_count() == counts[kind], kind
