"""The layer-by-layer rotation writes the whole-model rotation's folder, holding one layer at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.loading import load_model
from rotaq.rotations.stage import RotateOptions, max_relative_error, run_rotate
from tests.tiny_models import TINY_CONFIGS, random_tokens, save_hf_folder, tiny_model

FAMILIES = list(TINY_CONFIGS)


def rotate_both_ways(source: Path, out: Path, **options: object) -> tuple[Path, Path]:
    streamed = run_rotate(RotateOptions(model=str(source), out=out / "streamed", progress=False, **options))
    whole = run_rotate(RotateOptions(model=str(source), out=out / "whole", layer_by_layer=False, progress=False,
                                     **options))
    return streamed, whole


def manifest(folder: Path) -> dict:
    return json.loads((folder / "rotaq.json").read_text())


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_by_layer_folder_equals_the_whole_model_folder(name: str, tmp_path: Path) -> None:
    source = save_hf_folder(tiny_model(name, num_hidden_layers=3), tmp_path / "source")
    streamed, whole = rotate_both_ways(source, tmp_path, seed=3)
    assert (streamed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert json.loads((streamed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
    streamed_section, whole_section = manifest(streamed)["rotation"], manifest(whole)["rotation"]
    assert streamed_section.pop("check")["layer_by_layer"] is True
    whole_check = whole_section.pop("check")
    assert streamed_section == whole_section
    assert manifest(streamed)["files"]["model.safetensors"] == manifest(whole)["files"]["model.safetensors"]
    assert whole_check["max_relative_logit_error"] < 1e-4


def test_a_sharded_source_gives_the_same_weights(tmp_path: Path) -> None:
    model = tiny_model("qwen2-bias", num_hidden_layers=3)
    single = save_hf_folder(model, tmp_path / "single")
    sharded = save_hf_folder(model, tmp_path / "sharded", max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    one = run_rotate(RotateOptions(model=str(single), out=tmp_path / "one", progress=False))
    many = run_rotate(RotateOptions(model=str(sharded), out=tmp_path / "many", progress=False))
    assert (one / "model.safetensors").read_bytes() == (many / "model.safetensors").read_bytes()


def test_a_bf16_source_stays_bf16_and_keeps_its_function(tmp_path: Path) -> None:
    model = tiny_model("llama-untied", num_hidden_layers=3).to(torch.bfloat16)
    source = save_hf_folder(model, tmp_path / "source")
    out = run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    with safe_open(str(out / "model.safetensors"), framework="pt") as tensors:
        assert {tensors.get_slice(name).get_dtype() for name in tensors.keys()} == {"BF16"}
    check = manifest(out)["rotation"]["check"]
    assert 0 < check["max_relative_logit_error"] < 5e-2  # bf16 rounding of the rotated weights, not zero
    tokens = random_tokens()
    with torch.inference_mode():
        expected = model.float()(input_ids=tokens).logits
        actual = load_model(str(out)).model(input_ids=tokens).logits
    assert max_relative_error(actual, expected) < 5e-2


def test_only_one_decoder_layer_holds_memory_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.rotations.streamed as streamed

    source = save_hf_folder(tiny_model("llama-tied", num_hidden_layers=4), tmp_path / "source")
    seen: list[int] = []
    real_rotate_layer = streamed.rotate_decoder_layer

    def watching(layer: torch.nn.Module, family, *args, **kwargs) -> None:
        model_layers = watching.layers
        loaded = [i for i, other in enumerate(model_layers) if not next(other.parameters()).is_meta]
        seen.append(len(loaded))
        real_rotate_layer(layer, family, *args, **kwargs)

    real_empty_model = streamed.empty_model

    def empty_model(config):
        model = real_empty_model(config)
        watching.layers = model.model.layers
        return model

    monkeypatch.setattr(streamed, "rotate_decoder_layer", watching)
    monkeypatch.setattr(streamed, "empty_model", empty_model)
    run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    assert seen == [1, 1, 1, 1]


def test_a_wrong_rotation_is_caught_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.rotations.streamed as streamed

    source = save_hf_folder(tiny_model("llama-untied"), tmp_path / "source")
    monkeypatch.setattr(streamed, "rotate_head", lambda model, family, rotation: None)  # lm_head left unrotated
    with pytest.raises(RotaqError, match="rotation changed the logits"):
        run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", progress=False))
    assert not (tmp_path / "rotated").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


def test_a_learned_rotation_loads_the_whole_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rotaq.rotations.stage as stage

    monkeypatch.setattr(stage, "rotate_streamed", lambda *a, **k: pytest.fail("learned rotations need the model"))
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("whole model")))
    source = save_hf_folder(tiny_model("llama-untied"), tmp_path / "source")
    with pytest.raises(RuntimeError, match="whole model"):
        run_rotate(RotateOptions(model=str(source), out=tmp_path / "rotated", rotation="learned", progress=False))


def test_a_hub_id_is_rotated_layer_by_layer_from_its_cached_snapshot(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id's safetensors snapshot (here a cached one, the hub unreachable) streams like a local folder."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someorg--tiny"
    snapshot = save_hf_folder(tiny_model("llama-untied", num_hidden_layers=2), repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("rotaq.pipeline.loading._hub_reachable", lambda: False)
    local = run_rotate(RotateOptions(model=str(snapshot), out=tmp_path / "local", progress=False))
    monkeypatch.setattr("rotaq.rotations.stage.load_model", lambda *a, **k: pytest.fail("loaded the whole model"))
    hub = run_rotate(RotateOptions(model="someorg/tiny", out=tmp_path / "hub-rotated", progress=False))
    assert (hub / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert json.loads((hub / "rotaq.json").read_text())["source"] == {"kind": "hub", "id": "someorg/tiny",
                                                                      "model_type": "llama"}
