"""The accuracy table's rotated folders: a learned rotation gets its own rows beside the built-in ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rotaq.eval.accuracy_table import AccuracyTableOptions, run_accuracy_table
from rotaq.pipeline.cli import main
from rotaq.pipeline.data import DataSpec
from rotaq.pipeline.errors import RotaqError
from rotaq.rotations.stage import RotateOptions, run_rotate


def _table_options(model: Path, text: Path, out: Path, **overrides) -> AccuracyTableOptions:
    data = DataSpec(source=str(text), seq_len=32, max_tokens=128)
    return AccuracyTableOptions(out=out, model=str(model), schemes=("w4a4",), weight_methods=("rtn",),
                                evaluation=data, calibration=data, progress=False, **overrides)


@pytest.fixture(scope="module")
def rotated_folders(tiny_hf_folder: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rotated")
    hadamard = run_rotate(RotateOptions(model=str(tiny_hf_folder), out=root / "hadamard", progress=False))
    learned = run_rotate(RotateOptions(model=str(tiny_hf_folder), out=root / "learned", rotation="learned",
                                       steps=3, lr=0.05, learn_weights="float", progress=False,
                                       calibration=DataSpec(source=str(tiny_text_file), seq_len=16, max_tokens=96)))
    return hadamard, learned


def test_rotated_folders_get_rows_labelled_with_their_rotation(tiny_hf_folder: Path, tiny_text_file: Path,
                                                               tmp_path: Path, rotated_folders) -> None:
    hadamard_folder, learned_folder = rotated_folders
    options = _table_options(tiny_hf_folder, tiny_text_file, tmp_path, rotations=(True,),
                             rotated=(hadamard_folder, learned_folder))
    rows = run_accuracy_table(options)
    by_label = {(row["rotation"], row["rotation_detail"]): row for row in rows if row["scheme"] == "w4a4"}
    learned_label = next(label for label in by_label if label[0] == "learned")
    assert set(by_label) == {("hadamard", "-"), learned_label}, by_label.keys()
    assert learned_label[1] == "R1+R2, for w4a4, float weights, 3 steps, lr 0.05"
    # The folder written by `rotaq rotate` is the built-in Hadamard rotation (same seed): one row, not two.
    assert len([row for row in rows if row["rotation"] == "hadamard"]) == 1
    assert by_label[learned_label]["perplexity"] != by_label[("hadamard", "-")]["perplexity"]
    written = json.loads((tmp_path / "accuracy.json").read_text())
    assert [row["rotation_detail"] for row in written] == [row["rotation_detail"] for row in rows]
    assert "| learned | R1+R2, for w4a4" in (tmp_path / "accuracy.md").read_text()


def test_the_folder_scores_like_the_built_in_rotation(tiny_hf_folder: Path, tiny_text_file: Path, tmp_path: Path,
                                                      rotated_folders) -> None:
    """A rotated folder scored through --rotated gives the built-in rotation's numbers (same seed, same code)."""
    built_in = run_accuracy_table(_table_options(tiny_hf_folder, tiny_text_file, tmp_path / "a", rotations=(True,)))
    folder = run_accuracy_table(_table_options(tiny_hf_folder, tiny_text_file, tmp_path / "b", rotations=(),
                                               rotated=(rotated_folders[0],)))
    assert [row["perplexity"] for row in built_in] == pytest.approx([row["perplexity"] for row in folder], rel=1e-5)


def test_folders_that_are_not_rotations_of_the_model_are_refused(tiny_hf_folder: Path, tiny_text_file: Path,
                                                                  tmp_path: Path, rotated_folders) -> None:
    with pytest.raises(RotaqError, match="not a rotated model folder"):
        run_accuracy_table(_table_options(tiny_hf_folder, tiny_text_file, tmp_path, rotations=(),
                                          rotated=(tiny_hf_folder,)))
    with pytest.raises(RotaqError, match="not from the table's model"):
        run_accuracy_table(_table_options(rotated_folders[0], tiny_text_file, tmp_path / "other", rotations=(),
                                          rotated=(rotated_folders[1],)))


def test_a_learned_rotation_name_is_a_one_line_error(tiny_hf_folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    code = main(["accuracy-table", "--model", str(tiny_hf_folder), "--out", str(tmp_path), "--rotation", "learned"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "--rotated DIR" in error
