"""LoR2C through the stages on a tiny rotated model: training (with merges and injections), the folder,
resume across a structure change, the merge that keeps side paths, GPTQ calibration and the ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rotaq.adapters.finetune import ADAPTERS_FILE, TRAINING_LOG_FILE, run_finetune
from rotaq.adapters.kinds import installed_adapter
from rotaq.adapters.lor2c_config import INJECT_LOR2C, LOR2C_TYPES, MERGE_LOR2C, SHARE_LOR2C, Lor2cConfig
from rotaq.adapters.lor2c_paths import install_lor2c
from rotaq.adapters.merge_stage import MergeOptions, run_merge
from rotaq.export.checks import check_graph_matches_model
from rotaq.export.stage import ExportOptions, build_graph, run_export
from rotaq.pipeline.artifacts import read_manifest
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import decoder_layers, family_for_model
from rotaq.pipeline.loading import load_model
from rotaq.quantizers.calibration import capture_first_layer_inputs, run_layer
from rotaq.quantizers.stage import QuantizeOptions, run_quantize
from tests.test_finetune import interrupt_at_step
from tests.test_finetune_helpers import (  # noqa: F401 (one_torch_thread is an autouse fixture)
    SEQ_LEN,
    finetune_options,
    max_relative_error,
    one_torch_thread,
    rotated_three_layer_folder,
)
from tests.tiny_models import random_tokens, tiny_model


@pytest.fixture(scope="module")
def rotated(tiny_hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rotated_three_layer_folder(tiny_hf_folder, tmp_path_factory.mktemp("lor2c"))


@pytest.fixture(scope="module")
def merge_lor2c_folder(rotated: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """merge-lor2c with one merge after step 3 of 6: the merged path then trains for three steps."""
    out = tmp_path_factory.mktemp("merge-lor2c") / "out"
    return run_finetune(finetune_options(rotated, out, tiny_text_file, adapter=MERGE_LOR2C, lor2c_changes=1))


def test_merge_lor2c_trains_the_path_it_merged(merge_lor2c_folder: Path) -> None:
    section = read_manifest(merge_lor2c_folder)["adapters"]
    assert section["type"] == MERGE_LOR2C and len(section["spans"]) == 2
    assert [change["step"] for change in section["structure_changes"]] == [3]
    first, last = next(span for span in section["spans"] if span[0] != span[1])
    index = section["spans"].index([first, last])
    tensors = load_file(str(merge_lor2c_folder / ADAPTERS_FILE))
    assert tensors[f"rotaq_side_paths.paths.{index}.lora_B"].abs().sum() > 0  # zero when it was created
    assert section["trainable_parameters"] == sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize("kind", LOR2C_TYPES)
def test_finetune_folder_reloads_the_trained_paths(rotated: Path, tiny_text_file: Path, tmp_path: Path,
                                                   kind: str) -> None:
    out = run_finetune(finetune_options(rotated, tmp_path / "out", tiny_text_file, adapter=kind, lor2c_changes=None,
                                        training={"steps": 6}) if kind not in (MERGE_LOR2C, INJECT_LOR2C) else
                       finetune_options(rotated, tmp_path / "out", tiny_text_file, adapter=kind, lor2c_changes=1))
    section = read_manifest(out)["adapters"]
    log = json.loads((out / TRAINING_LOG_FILE).read_text())
    assert log["evaluations"][-1]["perplexity"] < log["evaluations"][0]["perplexity"]
    loaded = load_model(str(out))
    paths = installed_adapter(loaded.model)
    assert [list(span) for span in paths.spans()] == section["spans"]
    assert paths.injected_layers() == section["injected_layers"]
    assert (len(paths.injected_layers()) == 1) == (kind == INJECT_LOR2C)
    if kind == SHARE_LOR2C:
        assert len({id(path.lora_A) for path in paths.paths}) == 1
    saved = load_file(str(out / ADAPTERS_FILE))
    assert all(torch.equal(saved[name], tensor) for name, tensor in paths.named_tensors(loaded.model).items())


def test_resume_after_a_merge_gives_the_weights_of_an_uninterrupted_run(rotated: Path, tiny_text_file: Path,
                                                                          tmp_path: Path, merge_lor2c_folder: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    options = finetune_options(rotated, tmp_path / "b", tiny_text_file, adapter=MERGE_LOR2C, lor2c_changes=1)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 6, KeyboardInterrupt())  # after the merge (step 3) and the checkpoint at step 4
        with pytest.raises(KeyboardInterrupt):
            run_finetune(options)
    saved = json.loads((options.checkpoint_folder / "step-00000004" / "state.json").read_text())
    assert len(saved["structure"]["spans"]) == 2
    resumed = run_finetune(finetune_options(rotated, tmp_path / "b", tiny_text_file, adapter=MERGE_LOR2C,
                                            lor2c_changes=1, resume=True))
    expected, actual = load_file(str(merge_lor2c_folder / ADAPTERS_FILE)), load_file(str(resumed / ADAPTERS_FILE))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[name], tensor) for name, tensor in expected.items())


def test_lor2c_refuses_what_does_not_apply(rotated: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(RotaqError, match="--qat do"):
        run_finetune(finetune_options(rotated, tmp_path / "x", tiny_text_file, adapter="lor2c", qat="w4a4"))
    with pytest.raises(RotaqError, match="do not fit in 6 steps"):
        run_finetune(finetune_options(rotated, tmp_path / "x", tiny_text_file, adapter=MERGE_LOR2C, lor2c_changes=2,
                                      lor2c_interval=3))
    with pytest.raises(RotaqError, match="at most 2"):
        run_finetune(finetune_options(rotated, tmp_path / "x", tiny_text_file, adapter=MERGE_LOR2C, lor2c_changes=3))


@pytest.fixture(scope="module")
def side_path_folder(rotated: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """inject-lor2c trained, then merged: one injected LoRA folded, the other paths kept as side paths."""
    workdir = tmp_path_factory.mktemp("side-paths")
    trained = run_finetune(finetune_options(rotated, workdir / "ft", tiny_text_file, adapter=INJECT_LOR2C,
                                            lor2c_changes=1))
    merged, _ = run_merge(MergeOptions(model=str(trained), out=workdir / "merged", eval_tokens=SEQ_LEN * 4))
    return merged


def test_merge_folds_injected_lora_exactly_and_keeps_the_side_paths(side_path_folder: Path) -> None:
    manifest = read_manifest(side_path_folder)
    merge, side_paths = manifest["merge"], manifest["side_paths"]
    assert merge["exact"] and len(merge["folded_lora"]) == 2 and merge["side_paths"] == 2
    assert merge["error"]["max_relative_logit_error"] < 1e-5
    assert "adapters" not in manifest and len(side_paths["spans"]) == 2
    hidden = 48
    assert side_paths["flops_per_token"] == 2 * 4 * 4 * hidden and side_paths["parameters"] == 2 * 2 * 4 * hidden
    loaded = load_model(str(side_path_folder))
    assert installed_adapter(loaded.model).injected == {}
    assert all(path.lora_B.abs().sum() > 0 for path in installed_adapter(loaded.model).paths)


def test_layer_by_layer_calibration_adds_paths_that_span_layers() -> None:
    model = tiny_model("llama-untied", num_hidden_layers=4).eval()
    family = family_for_model(model)
    paths = install_lor2c(model, family, Lor2cConfig(rank=4), spans=[(0, 1), (1, 3), (2, 2)])
    for path in paths.paths:
        torch.nn.init.normal_(path.lora_B, std=0.1)
    windows = random_tokens(3, 10, seed=1)
    final: dict[str, torch.Tensor] = {}
    layers = decoder_layers(model, family)
    model.get_submodule(family.final_norm).register_forward_pre_hook(  # its input: the last layer's output
        lambda module, args: final.__setitem__("out", args[0]))
    with torch.no_grad():
        model(input_ids=windows[:2], use_cache=False)
        expected = final["out"]
    inputs = capture_first_layer_inputs(model, family, windows, batch_size=2)
    with paths.layer_by_layer() as runner:
        for index, layer in enumerate(layers):
            runner.before_layer(index, inputs.hidden_states)
            inputs.hidden_states = runner.after_layer(index, run_layer(layer, inputs))
    torch.testing.assert_close(inputs.hidden_states[0], expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the hooks are back afterwards
        model(input_ids=windows[:2], use_cache=False)
    torch.testing.assert_close(final["out"], expected)


def test_quantized_model_keeps_float_side_paths_and_its_graph_matches(side_path_folder: Path, tiny_text_file: Path,
                                                                      tmp_path: Path) -> None:
    quantized = run_quantize(QuantizeOptions(model=str(side_path_folder), out=tmp_path / "q", scheme="w4a4",
                                             weights="gptq", calibration=DataSpec(str(tiny_text_file), 32, 256),
                                             progress=False))
    manifest = read_manifest(quantized)
    assert manifest["side_paths"] == read_manifest(side_path_folder)["side_paths"]
    assert manifest["quantization"]["side_paths"] == "float32"
    loaded = load_model(str(quantized))
    merged = load_model(str(side_path_folder))
    for kept, original in zip(installed_adapter(loaded.model).paths, installed_adapter(merged.model).paths):
        assert torch.equal(kept.lora_B, original.lora_B)
    graph = build_graph(loaded)
    assert len(graph.side_paths) == 2
    tokens = random_tokens(2, 12, seed=3)
    assert check_graph_matches_model(graph, loaded.model, tokens)["max_rel_error"] < 1e-5


def test_exported_side_paths_match_pytorch_in_onnx_runtime(side_path_folder: Path, tmp_path: Path) -> None:
    out = run_export(ExportOptions(model=str(side_path_folder), out=tmp_path / "onnx"))
    manifest = json.loads((out / "export.json").read_text())
    checks = manifest["checks"]
    assert checks["graph_vs_model"]["max_rel_error"] < 1e-5
    cost = manifest["side_paths"]
    assert cost["count"] == 2 and cost["flops_per_token"] == 2 * 4 * 4 * 48 and 0 < cost["flops_share"] < 1
    assert cost["profile"]["nodes"] == 4 and 0 < cost["profile"]["decode"]["share"] < 1
    merged = load_model(str(side_path_folder))
    graph = build_graph(merged)
    with torch.no_grad():
        for path in graph.side_paths:
            path.up_t.zero_()
    tokens = random_tokens(2, 12, seed=3)
    assert max_relative_error(*_logits_pair(graph, merged.model, tokens)) > 1e-4  # the paths matter


def _logits_pair(graph, model, tokens):
    from rotaq.export.checks import graph_prefill_logits

    with torch.no_grad():
        return graph_prefill_logits(graph, tokens), model(input_ids=tokens).logits


def test_a_model_with_side_paths_is_not_fine_tuned_or_rotated_again(side_path_folder: Path, tiny_text_file: Path,
                                                                     tmp_path: Path) -> None:
    from rotaq.rotations.stage import RotateOptions, run_rotate

    with pytest.raises(RotaqError, match="carries LoR2C side paths"):
        run_finetune(finetune_options(side_path_folder, tmp_path / "x", tiny_text_file, adapter="lora"))
    with pytest.raises(RotaqError, match="already rotated"):
        run_rotate(RotateOptions(model=str(side_path_folder), out=tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
