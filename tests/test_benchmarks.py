"""The benchmarks that need hardware this machine lacks still run, at tiny sizes, on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent / "benchmarks"


def test_the_gpu_build_benchmark_runs_on_the_cpu_device() -> None:
    result = subprocess.run(
        [sys.executable, BENCHMARKS / "gpu_build.py", "--device", "cpu", "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert (row["width"], row["n_tokens"]) == (256, 2048)
    assert row["build_seconds"] > 0 and row["bare_seconds"] > 0
    assert row["build_over_bare"] == row["build_seconds"] / row["bare_seconds"]
    assert row["peak_rss_mb"] > 0
