"""Every user error the reliability review found, driven through the CLI: exit 2, one `rotaq: error:` line
naming the file, no traceback, and nothing half-written (no output folder, no temporary left beside it)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rotaq.pipeline.cli import main


@dataclass(frozen=True)
class Case:
    """A broken input, the command that meets it, and what the one-line error must say."""

    name: str
    prepare: Callable[[Path, Path, Path], list[str]]  # (tmp, tiny model, tiny text) -> argv
    message: str


def _model_copy(tmp: Path, model: Path) -> Path:
    return Path(shutil.copytree(model, tmp / "model"))


def _no_weights(tmp: Path, model: Path, text: Path) -> list[str]:
    folder = _model_copy(tmp, model)
    (folder / "model.safetensors").unlink()
    return ["rotate", "--model", str(folder), "--out", str(tmp / "out")]


def _truncated_weights(tmp: Path, model: Path, text: Path) -> list[str]:
    folder = _model_copy(tmp, model)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["rotate", "--model", str(folder), "--out", str(tmp / "out")]


def _garbage_weights(tmp: Path, model: Path, text: Path) -> list[str]:
    folder = _model_copy(tmp, model)
    (folder / "model.safetensors").write_bytes(os.urandom(5000))
    return ["rotate", "--model", str(folder), "--out", str(tmp / "out")]


class _RunsCode:
    """A pickle that would run a command when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(tmp: Path, model: Path, text: Path) -> list[str]:
    folder = _model_copy(tmp, model)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _RunsCode(tmp / "pwned")}))
    return ["rotate", "--model", str(folder), "--out", str(tmp / "out")]


def _custom_code(tmp: Path, model: Path, text: Path) -> list[str]:
    folder = tmp / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "mything", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    return ["rotate", "--model", str(folder), "--out", str(tmp / "out")]


def _run_config(tmp: Path, model: Path, data: str) -> list[str]:
    config = tmp / "rotaq.yaml"
    config.write_text(f"model: {model}\ndata: {data}\nseq_len: 32\n")
    return ["run", "--config", str(config), "--out", str(tmp / "out")]


def _binary_jsonl(tmp: Path, model: Path, text: Path) -> list[str]:
    (tmp / "data.jsonl").write_bytes(b'{"text": "w3 w4"}\n' + bytes(range(128, 256)) * 8)
    return _run_config(tmp, model, str(tmp / "data.jsonl"))


def _binary_text(tmp: Path, model: Path, text: Path) -> list[str]:
    (tmp / "data.txt").write_bytes(b"w3 w4 w5 " + b"\xff\xfe\x00\x81" * 100)
    return _run_config(tmp, model, str(tmp / "data.txt"))


def _missing_data(tmp: Path, model: Path, text: Path) -> list[str]:
    return _run_config(tmp, model, str(tmp / "no-such-text.txt"))


def _missing_model(tmp: Path, model: Path, text: Path) -> list[str]:
    return _run_config(tmp, tmp / "no-such-model", str(text))


CASES = [
    Case("folder without weights", _no_weights, "cannot load the model in"),
    Case("truncated safetensors", _truncated_weights, "damaged or truncated"),
    Case("garbage safetensors", _garbage_weights, "cannot load the model in"),
    Case("refused pickle", _malicious_pickle, "weights_only=True; nothing in it was run"),
    Case("custom code", _custom_code, "trust_remote_code), which rotaq never runs"),
    Case("binary jsonl", _binary_jsonl, "is not UTF-8 text"),
    Case("binary text", _binary_text, "is not UTF-8 text"),
    Case("missing data, before any stage", _missing_data, "data not found"),
    Case("missing model, before any stage", _missing_model, "model not found"),
]


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


def assert_one_line_error(captured: pytest.CaptureFixture, message: str) -> str:
    err = captured.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rotaq: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_with_exit_2_and_writes_nothing(
        case: Case, tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = case.prepare(tmp_path, tiny_hf_folder, tiny_text_file)
    assert main(argv) == 2
    assert_one_line_error(capsys, case.message)
    assert not (tmp_path / "out").exists()  # `rotaq run` checks model and data before it creates its folder
    assert not (tmp_path / "pwned").exists()
    assert leftovers(tmp_path) == []


def test_an_error_through_the_real_entry_point_has_no_traceback(tmp_path: Path, tiny_hf_folder: Path) -> None:
    argv = _truncated_weights(tmp_path, tiny_hf_folder, tmp_path)
    done = subprocess.run([sys.executable, "-m", "rotaq.pipeline.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().startswith("rotaq: error:")


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_the_tokenizer_is_written_keeps_the_previous_folder(
        tmp_path: Path, tiny_hf_folder: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rotated"
    assert main(["rotate", "--model", str(tiny_hf_folder), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from transformers import PreTrainedTokenizerFast

    def tokenizers_disk_full(*args: object, **kwargs: object) -> None:
        raise Exception("No space left on device (os error 28)")  # what the tokenizers Rust writer raises

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", tokenizers_disk_full)
    assert main(["rotate", "--model", str(tiny_hf_folder), "--out", str(out)]) == 2
    assert_one_line_error(capsys, "disk full while writing")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_disk_full_while_run_json_is_written(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                            capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rotaq.pipeline.atomic.os.fsync", _disk_full)
    assert main(_run_config(tmp_path, tiny_hf_folder, str(tiny_text_file))) == 2
    line = assert_one_line_error(capsys, "disk full while writing")
    assert "run.json" in line
    assert leftovers(tmp_path) == []


def test_an_unwritable_path_is_one_line(tmp_path: Path, tiny_hf_folder: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr("rotaq.pipeline.atomic.os.replace", denied)
    assert main(["init", "--out", str(tmp_path / "rotaq.yaml")]) == 2
    assert_one_line_error(capsys, "Permission denied")


def test_an_unreachable_hub_fails_at_once_without_retry_lines(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rotaq.pipeline.loading._hub_reachable", lambda: False)
    assert main(["rotate", "--model", "someorg/somemodel", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hub is unreachable" in err and "Retrying" not in err and "(offline?" not in err


def test_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    from rotaq.pipeline.atomic import atomic_write

    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "report.md", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
