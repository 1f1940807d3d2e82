"""The wheel installs one top-level package, `rotaq`, so rotaq can live beside packages that own the
names of its folders (AdapterHub's `adapters`, a user's `eval.py`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("pipeline", "rotations", "export", "eval", "quantizers", "adapters")


def _source_copy(target: Path) -> Path:
    """Only what the wheel is built from: the checkout also holds runs/ and .venv/."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_wheel_has_rotaq_as_its_only_top_level(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    source = _source_copy(tmp_path / "src")
    code = ("import sys, setuptools.build_meta as b; "
            "print(b.build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=source,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["rotaq"]
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    modules = [n for n in names if n.endswith(".py")]
    assert modules and all(n.startswith("rotaq/") for n in modules)
    sources = [path.relative_to(ROOT).as_posix() for folder in PACKAGE_FOLDERS for path in (ROOT / folder).rglob("*.py")
               if "__pycache__" not in path.parts]
    missing = [source for source in sources if f"rotaq/{source}" not in names]
    assert not missing, f"left out of the wheel (a subpackage missing from pyproject's packages?): {missing}"
    assert "rotaq = rotaq.pipeline.cli:main" in entry_points


def test_same_named_packages_in_the_working_directory_do_not_shadow_rotaq(tmp_path: Path) -> None:
    (tmp_path / "eval.py").write_text("raise SystemExit('the user eval.py was imported')\n")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "__init__.py").write_text("raise SystemExit('another adapters package was imported')\n")
    code = "import rotaq.eval.metrics, rotaq.adapters.chain, rotaq.pipeline.cli; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
