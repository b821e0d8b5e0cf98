"""What a build leaves behind when it runs beside another, fails, is killed, runs out of disk or
writes to an awkward file name."""

from __future__ import annotations

import fcntl
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from saescope.cli import app
from tests.pipeline.precompute.conftest import build_args, rows

runner = CliRunner()


def build_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "saescope.cli", *(str(arg) for arg in args)]


def test_concurrent_builds_into_one_file_both_land(
    tmp_path, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    out = tmp_path / "shared.db"
    builds = [
        subprocess.Popen(
            build_command(
                *build_args(tiny_model_dir, tiny_sae_dir, token_file, out, "--name", name)
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("first", "second")
    ]
    for build in builds:
        _, stderr = build.communicate(timeout=300)
        assert build.returncode == 0, stderr
    assert sorted(rows(out, "select name from saes")) == [("first",), ("second",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.db"]


@pytest.mark.parametrize("then", ["release", "terminate"])
def test_a_build_waits_for_the_one_writing_and_says_so(
    tmp_path, tiny_model_dir, tiny_sae_dir, token_file, then: str
) -> None:
    """While another build writes (holds the directory's lock), a build waits and says so; let
    go, it lands; terminated while waiting, it ends as interrupted and leaves nothing."""
    out = tmp_path / "features.db"
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as another build's write does
    try:
        build = subprocess.Popen(
            build_command(*build_args(tiny_model_dir, tiny_sae_dir, token_file, out)),
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = _lines(build.stderr)
        assert "another build is writing into" in _wait_for(lines, "another build")
        assert not out.exists()
        if then == "terminate":
            build.send_signal(signal.SIGTERM)
    finally:
        os.close(held)
    build.wait(timeout=300)
    time.sleep(0.2)  # the reader thread takes the last lines
    stderr = "".join(lines.queue)
    if then == "terminate":
        assert build.returncode == 130, stderr
        assert "interrupted" in stderr
        assert list(tmp_path.iterdir()) == []
    else:
        assert build.returncode == 0, stderr
        assert rows(out, "select name from saes") == [("tiny-sae",)]


def _lines(stream) -> queue.Queue:
    """The lines of a stream, read in the background."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        if text in line:
            return line


def test_a_killed_builds_temporary_file_is_removed_by_the_next_build(
    tmp_path, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    out = tmp_path / "features.db"
    for litter in (".features.db.4242.tmp", ".features.db.4242.tmp-journal"):
        (tmp_path / litter).write_bytes(b"left by a build killed mid-write")
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, build_args(tiny_model_dir, tiny_sae_dir, token_file, out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.db", "notes.txt"]


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_is_an_error_and_leaves_the_previous_file(
    tmp_path, built_db, tiny_model_dir, tiny_sae_dir, token_file, existing: bool
) -> None:
    out = tmp_path / "features.db"
    if existing:
        out.write_bytes(built_db.read_bytes())
    limit = out.stat().st_size // 2 if existing else 64 * 1024
    args = build_args(tiny_model_dir, tiny_sae_dir, token_file, out, "--name", "another")
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from saescope.cli import main\n"
        f"sys.argv = ['saescope', *{args!r}]\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: cannot write"), result.stderr
    assert "Traceback" not in result.stderr
    assert "not a saescope database" not in result.stderr
    if existing:
        assert out.read_bytes() == built_db.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["features.db"] if existing else [])


def test_an_sae_that_never_fires_is_a_valid_build(
    tmp_path, tiny_model_dir, tiny_sae_dir, token_file
) -> None:
    import torch
    from sae_lens import SAE

    silent = tmp_path / "silent-sae"
    sae = SAE.load_from_disk(tiny_sae_dir)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
    sae.save_model(silent)
    out = tmp_path / "silent.db"
    result = runner.invoke(app, build_args(tiny_model_dir, silent, token_file, out))
    assert result.exit_code == 0, result.output
    assert rows(out, "select dead_count, d_sae, l0 from saes") == [(64, 64, 0.0)]
    assert rows(out, "select count(*) from token_latents") == [(0,)]


@pytest.mark.parametrize("name", ["p%41.db", "a#b.db", "q?x.db", "sp ace.db", "ünï.db"])
def test_any_legal_file_name_works(
    tmp_path, built_db, tiny_model_dir, tiny_sae_dir, token_file, name: str
) -> None:
    from fastapi.testclient import TestClient

    from saescope.server.app import create_app
    from saescope.server.settings import Settings

    out = tmp_path / name
    out.write_bytes(built_db.read_bytes())
    args = build_args(tiny_model_dir, tiny_sae_dir, token_file, out, "--name", "second")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    client = TestClient(create_app(Settings(database=out)))
    assert client.get("/api/v1/health").json()["saes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    with sqlite3.connect(out) as connection:
        assert connection.execute("select count(*) from saes").fetchone() == (2,)


def test_out_is_a_directory(tmp_path, tiny_model_dir, tiny_sae_dir, token_file) -> None:
    result = runner.invoke(app, build_args(tiny_model_dir, tiny_sae_dir, token_file, tmp_path))
    assert result.exit_code == 2
    assert "is a directory" in result.output and "Traceback" not in result.output


def test_a_hook_other_than_the_saes_is_named(
    tmp_path, tiny_model_dir, tiny_sae_dir, token_file, caplog
) -> None:
    out = tmp_path / "other-hook.db"
    args = build_args(tiny_model_dir, tiny_sae_dir, token_file, out)
    args[args.index("--hook") + 1] = "blocks.0.hook_resid_pre"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    warning = [r.getMessage() for r in caplog.records if "cfg.json names hook" in r.getMessage()]
    assert warning == [
        "the SAE's cfg.json names hook 'blocks.1.hook_resid_pre', but --hook is "
        "'blocks.0.hook_resid_pre': reading 'blocks.0.hook_resid_pre'"
    ]
    assert rows(out, "select hook from saes") == [("blocks.0.hook_resid_pre",)]
