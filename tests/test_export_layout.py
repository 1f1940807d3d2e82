"""export.json may only name files inside its own folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rotaq.export.layout import EXPORT_FORMAT, MANIFEST_NAME, read_layout
from rotaq.pipeline.errors import ArtifactError


def _export_folder(folder: Path, graph: str) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": EXPORT_FORMAT, "graph": graph, "num_layers": 1,
                                                    "num_kv_heads": 1, "head_dim": 8, "vocab_size": 16}))
    return folder


@pytest.mark.parametrize("graph", ["../other/model.onnx", "/etc/passwd", "sub/../../model.onnx"])
def test_a_graph_outside_the_folder_is_refused(tmp_path: Path, graph: str) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.onnx").write_bytes(b"not yours")
    layout = read_layout(_export_folder(tmp_path / "export", graph))
    with pytest.raises(ArtifactError, match="outside the export folder"):
        _ = layout.graph_path


def test_a_graph_inside_the_folder_is_found(tmp_path: Path) -> None:
    layout = read_layout(_export_folder(tmp_path / "export", "graphs/model.onnx"))
    assert layout.graph_path == tmp_path / "export" / "graphs" / "model.onnx"
