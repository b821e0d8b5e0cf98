"""The wheels a GPU machine that has PyTorch, but not this project's other dependencies, needs to
run `gpu_build.py`: every distribution of `saescope[pipeline]`'s closure that a build imports
(as a tiny build here shows) and the machine lacks, at the versions installed here (they are
known to work together), for the machine's Python, downloaded from the package index into one
folder that travels with the checkout. The machine's own torch is never touched: torch and the
CUDA and Triton distributions it brings are left out, whatever the list of what the machine has.

Here (with the package index reachable), given the machine's `python3 -m pip list
--format=freeze` in machine.txt:

    python tests/benchmarks/gpu_wheels.py --out .whl --provided machine.txt --python-version 3.12

There (no index needed; the project is installed from the checkout, and the wheels beside it
into a folder of their own, put first on the path):

    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target /tmp/site . .whl/*.whl
    PYTHONPATH=/tmp/site python3 tests/benchmarks/gpu_build.py
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

logger = logging.getLogger("gpu_wheels")

ROOT = Path(__file__).resolve().parents[2]
# torch's own distributions: the machine's build of them stays in charge.
MACHINE_OWNS = ("torch", "triton", "nvidia-", "cuda-")
# Linux x86-64 wheels, newest glibc tags first; pip matches a tag exactly.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


def closure(root: str, extras: tuple[str, ...], python_version: str) -> dict[str, str]:
    """Name ↦ installed version of `root` and everything it requires, with the environment
    markers read for `python_version` on Linux x86-64."""
    environment = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    found: dict[str, str] = {}
    pending = [(root, extras)]
    visited: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        name, wanted = pending.pop()
        key = (canonicalize_name(name), tuple(sorted(wanted)))
        if key in visited:
            continue
        visited.add(key)
        distribution = metadata.distribution(key[0])
        found[key[0]] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            applies = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra})
                for extra in ("", *wanted)
            )
            if applies:
                pending.append((requirement.name, tuple(requirement.extras)))
    return found


def imported_by_a_build() -> set[str]:
    """The distributions whose modules `gpu_build.py --device cpu --tiny` imports here, in
    itself and in the processes it starts (its bare loop and its whole build): what the
    machine's build will import, whatever the distributions declare."""
    with tempfile.TemporaryDirectory() as hook:
        modules = Path(hook) / "modules.txt"
        # Every Python process that starts with this on its path writes its modules at exit.
        (Path(hook) / "sitecustomize.py").write_text(
            "import atexit, os, sys\n"
            "def record():\n"
            "    with open(os.environ['SAESCOPE_IMPORTED'], 'a') as out:\n"
            "        out.write('\\n'.join(name.split('.')[0] for name in sys.modules) + '\\n')\n"
            "atexit.register(record)\n"
        )
        path = os.pathsep.join(filter(None, [hook, os.environ.get("PYTHONPATH")]))
        subprocess.run(
            [sys.executable, Path(__file__).with_name("gpu_build.py"), "--device", "cpu", "--tiny"],
            env={**os.environ, "PYTHONPATH": path, "SAESCOPE_IMPORTED": str(modules)},
            capture_output=True, check=True,
        )  # fmt: skip
        imported = set(modules.read_text().split())
    owners = metadata.packages_distributions()
    return {canonicalize_name(name) for module in imported for name in owners.get(module, [])}


def provided(listing: Path | None) -> set[str]:
    """The distributions a `pip list --format=freeze` listing names."""
    if listing is None:
        return set()
    names = (line.split("==")[0].strip() for line in listing.read_text().splitlines())
    return {canonicalize_name(name) for name in names if name and not name.startswith("#")}


def fetch(requirement: str, out: Path, python_version: str) -> None:
    """The distribution's wheel for the machine's Python on Linux x86-64; where the index has
    only its source, a wheel built here, which must then be pure Python."""
    platforms = [option for tag in PLATFORMS for option in ("--platform", tag)]
    downloaded = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp", *platforms,
            "-d", out, requirement,
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    if downloaded.returncode == 0:
        return
    with tempfile.TemporaryDirectory() as build:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", build, requirement],
            check=True,
        )
        (wheel,) = Path(build).glob("*.whl")
        if not wheel.name.endswith("-none-any.whl"):
            sys.exit(f"{requirement}: no wheel for Python {python_version}, and its source builds "
                     f"a compiled one ({wheel.name})")  # fmt: skip
        wheel.rename(out / wheel.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument(
        "--provided", type=Path, default=None, help="The machine's `pip list --format=freeze`."
    )
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    has = provided(args.provided)
    imported = imported_by_a_build()
    wanted = {
        name: version
        for name, version in closure("saescope", ("pipeline",), args.python_version).items()
        if name in imported
        and name != "saescope"
        and name not in has
        and not name.startswith(MACHINE_OWNS)
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, version in sorted(wanted.items()):
        fetch(f"{name}=={version}", args.out, args.python_version)
    wheels = sorted(args.out.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    logger.info(
        "%d wheels in %s, %.1f MiB: %s",
        len(wheels),
        args.out,
        size / 2**20,
        ", ".join(sorted(wanted)),
    )


if __name__ == "__main__":
    main()
