"""The installed package claims one name: `saescope`, with every module and data file under it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("cli", "db", "server", "frontend", "pipeline")


def test_wheel_installs_under_one_namespace(tmp_path: Path) -> None:
    # Built from a copy of the sources: the build leaves its own folders behind.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_outside_the_sources)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path / "wheel")],
        check=True, timeout=300,
    )  # fmt: skip
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", environment], check=True)
    python = environment / "bin" / "python"
    (wheel,) = (tmp_path / "wheel").glob("saescope-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--quiet", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    site = Path(purelib)
    claimed = {path.name for path in site.iterdir()} - {"__pycache__"}
    assert {name for name in claimed if not name.endswith(".dist-info")} == {"saescope"}

    installed = site / "saescope"
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*"):
            if "__pycache__" in source.parts or source.is_dir():
                continue
            relative = source.relative_to(ROOT)
            assert (installed / relative).is_file(), f"{relative} is not installed"
    assert not any((site / name).exists() for name in PACKAGES)


def _outside_the_sources(directory: str, names: list[str]) -> set[str]:
    """What the copy leaves out: caches everywhere, and at the top what is not the project's."""
    left_out = {name for name in names if name == "__pycache__" or name.startswith(".")}
    if Path(directory) == ROOT:
        left_out |= {"build", "data", *(name for name in names if name.endswith(".egg-info"))}
    return left_out
