"""The merge stage: exact merges for lora/bs, paper vs least-squares for is/ms, plain reloadable output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rotaq.adapters.finetune import run_finetune
from rotaq.adapters.layers import AdaptedLinear
from rotaq.adapters.merge_stage import MergeOptions, run_merge
from rotaq.pipeline.artifacts import read_manifest
from rotaq.pipeline.cli import main
from rotaq.pipeline.errors import ArtifactError
from rotaq.pipeline.loading import load_model
from rotaq.rotations.online import OnlineRotatedLinear
from tests.test_finetune_helpers import (  # noqa: F401 (one_torch_thread is an autouse fixture)
    SEQ_LEN,
    finetune_options,
    max_relative_error,
    one_torch_thread,
    rotated_three_layer_folder,
)
from tests.tiny_models import random_tokens

EVAL_TOKENS = SEQ_LEN * 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def rotated(tiny_hf_folder: Path, workdir: Path) -> Path:
    return rotated_three_layer_folder(tiny_hf_folder, workdir)


@pytest.fixture(scope="module")
def finetuned(rotated: Path, tiny_text_file: Path, workdir: Path) -> dict[str, Path]:
    """One trained folder per adapter type (the ms one with QAT), shared by the tests below."""
    qat = {"reslora-ms": "w4a8"}
    return {kind: run_finetune(finetune_options(rotated, workdir / kind, tiny_text_file, adapter=kind,
                                                qat=qat.get(kind)))
            for kind in ("lora", "reslora-is", "reslora-bs", "reslora-ms")}


def merge(folder: Path, out: Path, method: str = "lstsq") -> dict:
    return run_merge(MergeOptions(model=str(folder), out=out, method=method, eval_tokens=EVAL_TOKENS,
                                  calibration_tokens=EVAL_TOKENS))[1]


@pytest.mark.parametrize("kind", ["lora", "reslora-bs"])
def test_lora_and_block_shortcut_merge_exactly(finetuned: dict[str, Path], tmp_path: Path, kind: str) -> None:
    section = merge(finetuned[kind], tmp_path / "merged")
    assert section["method"] == "exact" and section["error"]["max_relative_logit_error"] < 1e-4

    adapted, merged = load_model(str(finetuned[kind])).model, load_model(str(tmp_path / "merged")).model
    tokens = random_tokens(length=SEQ_LEN)
    with torch.no_grad():
        assert max_relative_error(merged(input_ids=tokens).logits, adapted(input_ids=tokens).logits) < 1e-4


def test_merged_folder_is_a_plain_rotated_model(finetuned: dict[str, Path], rotated: Path, tmp_path: Path) -> None:
    merge(finetuned["reslora-bs"], tmp_path / "merged")
    manifest = read_manifest(tmp_path / "merged")
    assert manifest["stage"] == "merge" and "adapters" not in manifest
    assert manifest["rotation"] == read_manifest(rotated)["rotation"]
    loaded = load_model(str(tmp_path / "merged"))
    assert not any(isinstance(module, AdaptedLinear) for module in loaded.model.modules())
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, OnlineRotatedLinear)
    assert set(loaded.model.state_dict()) == set(load_model(str(rotated)).model.state_dict())


@pytest.mark.parametrize("kind", ["reslora-is", "reslora-ms"])
def test_least_squares_merge_is_not_worse_than_the_paper_merge(finetuned: dict[str, Path], tmp_path: Path,
                                                               kind: str) -> None:
    paper = merge(finetuned[kind], tmp_path / "paper", method="paper")
    lstsq = merge(finetuned[kind], tmp_path / "lstsq", method="lstsq")
    assert not paper["exact"] and paper["method"] == "paper" and lstsq["method"] == "lstsq"
    assert 0 < lstsq["error"]["kl_divergence"] <= paper["error"]["kl_divergence"]
    assert lstsq["calibration"]["ridge"] in (1e-3, 1e-2, 1e-1, 1.0, "paper")
    assert lstsq["calibration"]["fit_tokens"] + lstsq["calibration"]["selection_tokens"] == lstsq["calibration"]["tokens"]


def test_qat_is_recorded_and_reloaded(finetuned: dict[str, Path], tmp_path: Path) -> None:
    reloaded = load_model(str(finetuned["reslora-ms"])).model
    assert all(m.fake_quantizers.name == "w4a8" for m in reloaded.modules() if isinstance(m, AdaptedLinear))
    assert merge(finetuned["reslora-ms"], tmp_path / "merged", method="paper")["qat"] == "w4a8"


def test_merging_a_folder_without_adapters_is_refused(rotated: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ArtifactError, match="nothing to merge"):
        merge(rotated, tmp_path / "merged")
    code = main(["merge", "--model", str(rotated), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to merge" in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_unknown_merge_method_is_one_line_error(finetuned: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    code = main(["merge", "--model", str(finetuned["reslora-is"]), "--method", "svd", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "--method: 'svd' is not one of lstsq, paper" in err and err.count("\n") == 1
