"""ONNX export of every tiny family, float32, rotated and not: ORT matches PyTorch, the KV cache is exact.

Llama-tied rotated goes through the whole stage instead (rotate folder → `rotaq export`), in
test_export_stage.py, with the same checks as here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rotaq.export.checks import check_onnx_file, decode_logits, max_relative_error
from rotaq.export.generate import SamplingOptions, generate_ids
from rotaq.export.graph_module import DecoderGraph
from rotaq.export.runtime import OnnxDecoder
from rotaq.export.stage import write_onnx_folder
from rotaq.pipeline.families import family_for_model
from rotaq.pipeline.loading import LoadedModel
from rotaq.rotations.rotate import RotationConfig, rotate_model
from rotaq.export.fused_graph import FUSED_LAYOUT, TRACED_LAYOUT
from rotaq.export.genai_folder import check_genai_loads, genai_config, write_genai_config
from tests.tiny_models import FUSED_OVERRIDES, TINY_CONFIGS, random_tokens, tiny_model

# "rotated": the default rotation (R2 per value head offline, the down_proj Hadamard online); "online-blocks":
# an online Hadamard before o_proj too, both block-diagonal (blocks of 4 divide every tiny width).
ROTATIONS = {"plain": None, "rotated": RotationConfig(seed=1),
             "online-blocks": RotationConfig(seed=1, o_proj_rotation="online", online_block=4)}
CASES = [(name, rotation, layout) for layout in (FUSED_LAYOUT, TRACED_LAYOUT) for name in sorted(TINY_CONFIGS)
         for rotation in ROTATIONS if (name, rotation, layout) != ("llama-tied", "rotated", TRACED_LAYOUT)
         and (rotation != "online-blocks" or layout == FUSED_LAYOUT)]


@dataclass
class Exported:
    model: torch.nn.Module
    decoder: OnnxDecoder


def export_tiny(model: torch.nn.Module, folder: Path, layout: str = TRACED_LAYOUT) -> OnnxDecoder:
    """model → export forward → model.onnx + export.json, as the stage writes them (checks aside)."""
    family = family_for_model(model)
    manifest = write_onnx_folder(LoadedModel(model, None, family, {"kind": "test"}), DecoderGraph(model, family),
                                 folder, layout)
    assert manifest["layout"] == layout, manifest.get("layout_reason")
    return OnnxDecoder(folder)


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{r}-{layout}" for n, r, layout in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    name, rotation, layout = request.param
    if layout == FUSED_LAYOUT:
        # Built, not traced, so cheap: two layers (four for SmolLM3, whose 4th is a NoPE layer), the head
        # size GroupQueryAttention needs and a sliding window shorter than the prompts.
        model = tiny_model(name, num_hidden_layers=4 if name == "smollm3" else 2, overrides=FUSED_OVERRIDES[name])
    else:
        # One layer keeps each dynamo export to seconds; the two-layer stage tests cover cache slots per layer.
        model = tiny_model(name, num_hidden_layers=1)
    if ROTATIONS[rotation] is not None:
        rotate_model(model, family_for_model(model), ROTATIONS[rotation])
    return Exported(model, export_tiny(model, tmp_path_factory.mktemp(f"onnx-{name}"), layout))


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=tokens).logits


def check_runtime_matches_pytorch(model: torch.nn.Module, decoder: OnnxDecoder) -> None:
    check_onnx_file(decoder.layout.graph_path)
    tokens = random_tokens(2, 20)
    assert max_relative_error(decoder.logits(tokens.numpy()), hf_logits(model, tokens)) < 1e-4


def check_prefill_then_decode(decoder: OnnxDecoder) -> None:
    tokens = random_tokens(2, 16, seed=3).numpy()
    full = decoder.logits(tokens)
    assert max_relative_error(decode_logits(decoder, tokens, steps=5), full[:, -5:]) < 1e-5


def check_left_padding(decoder: OnnxDecoder) -> None:
    """Row 1 is row 0's last 9 tokens behind 3 pad slots: its real positions and next step must agree."""
    tokens, pad = random_tokens(1, 12, seed=4).numpy(), 3
    batch = np.concatenate([tokens, np.concatenate([np.zeros((1, pad), np.int64), tokens[:, pad:]], axis=1)])
    mask = np.ones_like(batch)
    mask[1, :pad] = 0
    padded, past = decoder.step(batch, mask, decoder.empty_past(2))
    alone, alone_past = decoder.step(tokens[:, pad:], np.ones((1, 12 - pad), np.int64), decoder.empty_past(1))
    assert max_relative_error(padded[1:, pad:], alone) < 1e-5
    next_token = np.array([[5], [5]])
    padded_step, _ = decoder.step(next_token, np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1), past)
    alone_step, _ = decoder.step(next_token[:1], np.ones((1, 12 - pad + 1), np.int64), alone_past)
    assert max_relative_error(padded_step[1:], alone_step) < 1e-5


def check_greedy_matches_hf_generate(model: torch.nn.Module, decoder: OnnxDecoder) -> None:
    prompt = random_tokens(1, 6, seed=7)
    with torch.inference_mode():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                  do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert list(generate_ids(decoder, prompt[0].tolist(), SamplingOptions(max_new_tokens=12))) == expected


def check_genai_generates_like_the_decoder(model: torch.nn.Module, decoder: OnnxDecoder) -> None:
    """With its genai_config.json, onnxruntime-genai opens the folder and greedy-generates the tokens the
    ONNX Runtime loop generates."""
    pytest.importorskip("onnxruntime_genai")
    folder = decoder.layout.folder
    share = decoder.layout.manifest["layout"] == FUSED_LAYOUT
    write_genai_config(folder, genai_config(model.config, None, None, decoder.layout.manifest, share_buffer=share))
    prompt = random_tokens(1, 6, seed=7)[0].tolist()
    generated = check_genai_loads(folder, prompt, new_tokens=10).greedy_tokens
    assert generated == list(generate_ids(decoder, prompt, SamplingOptions(max_new_tokens=10)))


def test_graph_passes_checker_and_runtime_matches_pytorch(exported: Exported) -> None:
    check_runtime_matches_pytorch(exported.model, exported.decoder)


def test_prefill_then_decode_equals_one_long_prefill(exported: Exported) -> None:
    check_prefill_then_decode(exported.decoder)


def test_left_padded_row_matches_its_unpadded_run(exported: Exported) -> None:
    check_left_padding(exported.decoder)


def test_greedy_generation_matches_hf_generate(exported: Exported) -> None:
    check_greedy_matches_hf_generate(exported.model, exported.decoder)


def test_onnxruntime_genai_generates_what_pytorch_generates(exported: Exported) -> None:
    check_genai_generates_like_the_decoder(exported.model, exported.decoder)


def test_fused_layout_covers_sliding_windows_and_nope_layers() -> None:
    """The fused cases above include a window shorter than the prompts and a layer without RoPE."""
    assert tiny_model("mistral", num_hidden_layers=1, overrides=FUSED_OVERRIDES["mistral"]).config.sliding_window == 6
    smollm3 = tiny_model("smollm3", num_hidden_layers=4, overrides=FUSED_OVERRIDES["smollm3"])
    graph = DecoderGraph(smollm3, family_for_model(smollm3))
    assert [layer.attn.use_rope for layer in graph.layers].count(False) >= 1
