"""Text sources and the train / calibration / evaluation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rotaq.pipeline.data import (
    Document,
    load_documents,
    make_windows,
    split_tokens,
)
from rotaq.pipeline.errors import DataError


def test_default_text_is_the_shakespeare_plays() -> None:
    documents = load_documents(None)
    names = {d.name for d in documents}
    assert len(documents) >= 30
    assert any(name.endswith("hamlet.md") for name in names)


def test_text_folder_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    assert [d.text for d in load_documents(tmp_path)] == ["alpha", "beta"]

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert [d.text for d in load_documents(jsonl)] == ["one", "two"]


def test_bad_sources_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data not found"):
        load_documents(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        load_documents(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_documents(tmp_path / "empty")


def test_splits_are_disjoint_and_evaluation_is_last() -> None:
    documents = [list(range(i * 1000, i * 1000 + 1000)) for i in range(3)]
    train, calibration, evaluation = (split_tokens(documents, s) for s in ("train", "calibration", "evaluation"))
    assert len(train) == 2400 and len(calibration) == 300 and len(evaluation) == 300
    assert not set(evaluation) & (set(train) | set(calibration))
    assert not set(train) & set(calibration)
    assert evaluation[:100] == list(range(900, 1000))


def test_windows_respect_length_and_budget() -> None:
    windows = make_windows(list(range(1000)), seq_len=100, max_tokens=350)
    assert windows.shape == (3, 100)
    with pytest.raises(DataError, match="not enough text"):
        make_windows(list(range(50)), seq_len=100)
    assert Document("x", "y").name == "x"
