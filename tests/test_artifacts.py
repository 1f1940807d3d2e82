"""Stage folders: written atomically, reloaded exactly, never mistaken when half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rotaq.pipeline.artifacts import MANIFEST_NAME, new_manifest, read_manifest, verify_files, write_model_artifact
from rotaq.pipeline.errors import ArtifactError, RotaqError
from rotaq.pipeline.families import family_for_model
from rotaq.pipeline.loading import load_model
from rotaq.rotations.rotate import RotationConfig, rotate_model
from rotaq.rotations.stage import RotateOptions, max_relative_error, run_rotate
from tests.tiny_models import random_tokens


def test_rotated_folder_reloads_with_identical_logits(tiny_hf_folder: Path, tmp_path: Path) -> None:
    original = load_model(str(tiny_hf_folder))
    tokens = random_tokens()
    with torch.inference_mode():
        expected = original.model(input_ids=tokens).logits
    out = run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path / "rotated", seed=7))
    manifest = read_manifest(out)
    assert manifest["stage"] == "rotate" and manifest["rotation"]["seed"] == 7
    assert manifest["rotation"]["check"]["max_relative_logit_error"] < 1e-4
    assert "torch" in manifest["versions"] and "model.safetensors" in manifest["files"]
    verify_files(out, manifest)

    reloaded = load_model(str(out))
    with torch.inference_mode():
        actual = reloaded.model(input_ids=tokens).logits
    assert max_relative_error(actual, expected) < 1e-4
    assert reloaded.manifest["source"]["kind"] == "folder"


def test_already_rotated_model_is_refused(tiny_hf_folder: Path, tmp_path: Path) -> None:
    out = run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path / "rotated"))
    with pytest.raises(Exception, match="already rotated"):
        run_rotate(RotateOptions(model=str(out), out=tmp_path / "twice"))


def test_folder_without_manifest_is_not_a_stage_folder(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(ArtifactError, match="not a finished rotaq stage folder"):
        read_manifest(tmp_path / "half")


class SafetensorError(Exception):
    """Stands in for safetensors' own error type, which is how its Rust writer reports a full disk."""


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)")])
def test_failed_write_leaves_previous_folder_and_no_temp(tiny_hf_folder: Path, tmp_path: Path,
                                                         error: Exception) -> None:
    loaded = load_model(str(tiny_hf_folder))
    out = tmp_path / "model"
    write_model_artifact(out, loaded.model, loaded.tokenizer, new_manifest("test", {}, loaded.source, None))
    before = (out / MANIFEST_NAME).read_text()

    def failing_writer(path: Path) -> None:
        raise error

    with pytest.raises(RotaqError, match="disk full"):
        write_model_artifact(out, loaded.model, loaded.tokenizer, new_manifest("test2", {}, loaded.source, None),
                             extra_writers={"extra.bin": failing_writer})
    assert (out / MANIFEST_NAME).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_refuses_to_overwrite_unrelated_folder(tiny_hf_folder: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_hf_folder))
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        write_model_artifact(tmp_path / "precious", loaded.model, loaded.tokenizer,
                             new_manifest("test", {}, loaded.source, None))
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_modified_file_is_detected(tiny_hf_folder: Path, tmp_path: Path) -> None:
    out = run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path / "rotated"))
    config = json.loads((out / "config.json").read_text())
    config["comment"] = "edited"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="truncated or replaced"):  # the size differs: found without hashing
        verify_files(out, read_manifest(out), full=False)


def test_same_size_corruption_is_found_by_the_hash(tiny_hf_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_rotate(RotateOptions(model=str(tiny_hf_folder), out=tmp_path / "rotated"))
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    manifest = read_manifest(out)
    verify_files(out, manifest, full=False, names=["config.json"])  # other files are not read
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        verify_files(out, manifest, full=True)
    monkeypatch.setattr("rotaq.pipeline.artifacts.CHEAP_HASH_BYTES", 0)  # a large file: only its size is checked
    verify_files(out, manifest, full=False)


def test_rotation_without_online_rotations_still_exact(tiny_hf_folder: Path) -> None:
    loaded = load_model(str(tiny_hf_folder))
    tokens = random_tokens()
    with torch.inference_mode():
        expected = loaded.model(input_ids=tokens).logits
        section = rotate_model(loaded.model, family_for_model(loaded.model), RotationConfig(online=False))
        actual = loaded.model(input_ids=tokens).logits
    assert section["online"] == {}
    assert max_relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("stage", ["rotate", "quantize", "export", "merge", "finetune"])
def test_out_over_the_input_is_refused_and_loses_nothing(stage: str, tiny_hf_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    import shutil

    from rotaq.pipeline.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_hf_folder, model)
    (model / "my-notes.txt").write_text("keep me")
    before = sorted(p.name for p in model.iterdir())
    extra = ["--scheme", "w4a8", "--weights", "rtn"] if stage == "quantize" else []
    for out in (model, tmp_path):
        assert main([stage, "--model", str(model), "--out", str(out), *extra]) == 2
        assert "overlaps the input model" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before and (model / "my-notes.txt").read_text() == "keep me"
