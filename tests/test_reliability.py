"""Faults a production user meets: two writers in one folder, crashed writers' leftovers, corrupted caches,
and configs moved away from the working directory. Nothing here depends on how fast the machine is: the
concurrent-run test waits for the first run's progress line, never for a duration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rotaq.pipeline.artifacts import remove_stale_temporaries, staged_folder
from rotaq.pipeline.cli import main
from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.locks import LOCK_NAME, FolderBusyError, folder_lock
from tests.test_run import statuses, tiny_settings

REPO = Path(__file__).resolve().parents[1]
HOLD_LOCK = ("import sys; from pathlib import Path; from rotaq.pipeline.locks import folder_lock\n"
             "with folder_lock(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()")


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock until its stdin closes (or it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_held_folder_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path: Path) -> None:
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(FolderBusyError, match=f"in use by another rotaq process \\(pid {holder.pid}\\)"):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the pid stays in the lock file
        holder.wait()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)
    with folder_lock(tmp_path), folder_lock(tmp_path):  # free again (the kernel dropped it); re-entrant
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())


def _run_command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rotaq.pipeline.cli", "run", "--config", str(config), "--out", str(out)]


def test_two_runs_into_one_folder_one_refuses_and_the_other_keeps_its_own_results(
        tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path) -> None:
    first, second = tmp_path / "rtn.yaml", tmp_path / "w8a8.yaml"
    first.write_text(yaml.safe_dump(tiny_settings(tiny_hf_folder, tiny_text_file)))
    second.write_text(yaml.safe_dump(tiny_settings(tiny_hf_folder, tiny_text_file, quantize__schemes=["w8a8"])))
    out = tmp_path / "run"
    running = subprocess.Popen(_run_command(first, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in running.stdout:  # the lock is held before the first stage starts
            if ": running" in line:
                break
        refused = subprocess.run(_run_command(second, out), cwd=REPO, capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr
        assert f"pid {running.pid}" in refused.stderr and "Traceback" not in refused.stderr
        running.stdout.read()
        assert running.wait(timeout=600) == 0, running.stderr.read()
    finally:
        running.kill()
        running.wait()
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["quantize"]["schemes"] == ["w4a8"]
    assert "quantize-w4a8" in statuses(out) and "quantize-w8a8" not in statuses(out)


def test_a_killed_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "rotated"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".rotated.tmp-{dead.pid}-0123abcd"
    older_format = tmp_path / ".rotated.tmp-0123abcd"  # written by a rotaq that did not record its pid
    live = tmp_path / f".rotated.tmp-{os.getpid()}-89abcdef"
    other = tmp_path / f".rotated-2.tmp-{dead.pid}-0123abcd"  # another folder's: not ours to judge here
    for folder in (stale, older_format, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    with staged_folder(out) as tmp:
        (tmp / "rotaq.json").write_text("{}")
    assert out.is_dir() and live.is_dir() and other.is_dir()
    assert not stale.exists() and not older_format.exists()


def test_a_swap_killed_between_its_two_renames_gets_the_previous_output_back(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trash = tmp_path / f".rotated.old-{dead.pid}-0123abcd"
    trash.mkdir()
    (trash / "rotaq.json").write_text('{"previous": true}')
    assert remove_stale_temporaries(tmp_path / "rotated") == []
    assert json.loads((tmp_path / "rotated" / "rotaq.json").read_text()) == {"previous": True}


def test_a_truncated_stage_output_is_not_reused(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "rotaq.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(tiny_hf_folder, tiny_text_file, finetune__enabled=False)))
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 0
    weights = out / "rotate" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # what a full disk or a bad copy leaves
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rotate: not reused:" in printed and "truncated" in printed
    assert statuses(out)["rotate"] == "done" and statuses(out)["quantize-w4a8"] == "done"

    data = bytearray(weights.read_bytes())  # same size, other bytes: only a hash finds it
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["run", "--config", str(config), "--out", str(out), "--verify"]) == 0
    assert "does not match the SHA-256" in capsys.readouterr().out and statuses(out)["rotate"] == "done"


def test_a_corrupted_gguf_conversion_is_rebuilt(tmp_path: Path, tiny_hf_folder: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from rotaq.pipeline import loading

    monkeypatch.setenv("ROTAQ_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    conversions: list[Path] = []

    def convert(path: Path, cached: Path) -> None:  # the real conversion, with a tiny model for the GGUF
        conversions.append(cached)
        with staged_folder(cached) as tmp:
            for item in tiny_hf_folder.iterdir():
                shutil.copy(item, tmp / item.name)
            records = loading.file_records(tmp, exclude=(loading.CONVERSION_RECORD,))
            (tmp / loading.CONVERSION_RECORD).write_text(json.dumps(records))

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    loading.load_model(str(gguf))
    loading.load_model(str(gguf))
    assert len(conversions) == 1  # cached and verified
    weights = conversions[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "does not match the SHA-256" in loading.conversion_cache_problem(conversions[0])
    loaded = loading.load_model(str(gguf))
    assert len(conversions) == 2 and loading.conversion_cache_problem(conversions[0]) is None
    assert loaded.source["kind"] == "gguf"


def test_relative_paths_in_a_config_file_mean_its_folder(tmp_path: Path, tiny_hf_folder: Path,
                                                         tiny_text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from rotaq.pipeline.run.config_loading import load_run_config

    project = tmp_path / "project"
    shutil.copytree(tiny_hf_folder, project / "models" / "tiny")
    shutil.copy(tiny_text_file, project / "text.txt")
    (project / "rotaq.yaml").write_text("model: models/tiny\ndata: ./text.txt\nout: runs/x\n")
    monkeypatch.chdir(tmp_path)  # elsewhere than the config file
    config = load_run_config(project / "rotaq.yaml")
    assert config.model == str(project / "models" / "tiny") and config.data == str(project / "text.txt")
    assert config.out == "runs/x"  # like --out: relative to where the run is started
    hub = load_run_config(project / "rotaq.yaml", ["model=HuggingFaceTB/SmolLM2-135M"])
    assert hub.model == "HuggingFaceTB/SmolLM2-135M"


def test_run_checks_its_model_and_data_before_the_first_stage(tmp_path: Path, tiny_hf_folder: Path) -> None:
    from rotaq.pipeline.run.config_loading import config_from_mapping
    from rotaq.pipeline.run.execute import run_pipeline

    config = config_from_mapping({"model": str(tiny_hf_folder), "data": str(tmp_path / "missing.txt")})
    with pytest.raises(RotaqError, match="data not found"):
        run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_folder_killed_before_its_first_record_is_still_usable(tmp_path: Path) -> None:
    from rotaq.pipeline.run.execute import _prepare_run_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("12345\n")
    (folder / ".run.json.tmp-12345-0123abcd").write_text("{")
    assert _prepare_run_folder(folder) == folder.resolve()
    (folder / "notes.txt").write_text("a user's file")
    with pytest.raises(RotaqError, match="refusing to run into"):
        _prepare_run_folder(folder)


def test_a_sweep_whose_folder_is_in_use_is_refused(tmp_path: Path, tiny_hf_folder: Path, tiny_text_file: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(tiny_hf_folder, tiny_text_file)))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("config: base.yaml\ngrid:\n  quantize.weights: [rtn]\n")
    holder = _hold_lock(tmp_path / "sweep")  # another sweep into the same --out (and store)
    try:
        assert main(["sweep", str(sweep), "--out", str(tmp_path / "sweep")]) == 2
    finally:
        holder.stdin.close()
        holder.wait()
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "variants").exists()
