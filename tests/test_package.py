"""The library is its own package: it imports nothing of the studio, and its wheel holds only it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIO = ("gradio", "demo_models", "launcher", "ui", "app", "transformers", "skimage", "matplotlib")


def test_importing_the_library_imports_nothing_of_the_studio() -> None:
    code = f"import sys, parastep; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(STUDIO)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow
def test_the_wheel_holds_the_library_alone(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy of the whole tree: the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "runs", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("parastep-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"parastep"}
    assert "parastep/strategies/parastep.py" in names and "parastep/engine.py" in names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires if "extra ==" not in r)
    assert runtime == ["diffusers", "torch"], requires
    assert any(r.startswith("gradio") and "extra == " in r for r in requires)
