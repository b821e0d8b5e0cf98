"""Server latency under load: feature pages and JSON, token search and table pages against a trivial
endpoint.

Builds (once, cached at --db) a database of 16,384 features with the embedded demo model and an
SAE of random directions, serves it with `python -m saescope.server` in a subprocess, and loads
it with wrk (Debian's `wrk`, a C client, so the load generator takes little of the two cores),
requesting random features, tokens and table pages:
  - mixed, in one run: a wrk process per endpoint at once, 32 connections in all (the feature
    page, the feature JSON, the token search, the feature table's pages, /api/v1/health), so all
    are measured side by side under the same load;
  - one endpoint at a time: 32 connections on each in turn, the trivial one first and last (to
    see drift), which shows each endpoint's own saturated cost.
Prints p50, p95 and throughput per endpoint, as ratios to the trivial endpoint, and errors.

    python tests/benchmarks/server_load.py --db /tmp/bench16k.db
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

N_FEATURES = 16_384
SAE_NAME = "bench"
TRIVIAL = "trivial (/api/v1/health)"
# Each path is completed per request: `{feature}` by a random feature, `{cursor}` by a random
# feature-table cursor, `{token}` by a random token of SEARCHED.
ENDPOINTS = {
    TRIVIAL: "/api/v1/health",
    "feature page": f"/saes/{SAE_NAME}/features/{{feature}}",
    "feature JSON": f"/api/v1/saes/{SAE_NAME}/features/{{feature}}",
    "token search": f"/saes/{SAE_NAME}/search?token={{token}}",
    "table page": f"/saes/{SAE_NAME}?after={{cursor}}",
}
SEARCHED = ["def", "%20the", "(", "return", "%20of", "self", "%0A", "x", "The", "%20a"]
# wrk prints one RESULT line.
_WRK_SCRIPT = """
local template = os.getenv("PREFIX")
local tokens = {TOKENS}
math.randomseed(tonumber(os.getenv("SEED")))
request = function()
  local feature = math.random(0, LAST)
  local path = template:gsub("{feature}", feature):gsub("{cursor}", feature .. ":" .. feature)
  path = path:gsub("{token}", function() return tokens[math.random(#tokens)] end)
  return wrk.format("GET", path)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %f %f %f %d\\n", latency:percentile(50) / 1e6,
    latency:percentile(95) / 1e6, summary.requests / (summary.duration / 1e6),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk_script(n_features: int) -> str:
    """The Lua script of wrk requests over features 0 .. n_features − 1."""
    tokens = "{" + ", ".join(f'"{token}"' for token in SEARCHED) + "}"
    return _WRK_SCRIPT.replace("LAST", str(n_features - 1)).replace("{TOKENS}", tokens)


@contextmanager
def served(db: Path) -> Iterator[str]:
    """`python -m saescope.server DB` on a free port, until the block ends; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "saescope.server", str(db), "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/api/v1/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            sys.exit(f"the server did not answer on {base}")
        yield base
    finally:
        server.terminate()
        server.wait()


def build_database(path: Path) -> None:
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saescope.cli import app
    from saescope.pipeline.demo.builder import DEMO_HOOK, DEMO_MODEL, HELD_OUT_TOKENS
    from saescope.pipeline.models import activations_at_hook, load_model

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        tokens = HELD_OUT_TOKENS
        torch.manual_seed(0)
        sae = StandardSAE(
            StandardSAEConfig(
                d_in=128,
                d_sae=N_FEATURES,
                metadata=SAEMetadata(hook_name=DEMO_HOOK, context_size=128, prepend_bos=True),
            )
        )
        with torch.no_grad():  # every latent fires on about 0.5% of tokens
            sae.W_enc.normal_()
            model = load_model(str(DEMO_MODEL), "cpu", torch.float32, {}, quiet=True)
            sample = torch.from_numpy(np.load(tokens)[:8])
            x = activations_at_hook(model, DEMO_HOOK, sample)
            pre = (x.reshape(-1, 128) - sae.b_dec) @ sae.W_enc
            sae.b_enc.copy_(-torch.quantile(pre, 0.995, dim=0))
        sae.save_model(directory / "sae")
        app(
            ["build", "--model", str(DEMO_MODEL), "--hook", DEMO_HOOK, "--sae",
             str(directory / "sae"), "--corpus", str(tokens), "--out", str(path), "--name",
             SAE_NAME, "--n-tokens", "32768", "--eval-sequences", "8", "--quiet"],
            standalone_mode=False,
        )  # fmt: skip


def wrk(base: str, path: str, connections: int, seconds: float, script: Path, seed: int):
    """Starts wrk against one endpoint; returns the process (read with `result`)."""
    environment = {**os.environ, "PREFIX": path, "SEED": str(seed)}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "10s",
               "-s", str(script), base]  # fmt: skip
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)


def result(process: subprocess.Popen) -> tuple[float, float, float, int]:
    output = process.communicate()[0]
    match = re.search(r"RESULT (\S+) (\S+) (\S+) (\d+)", output)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    p50, p95, rate, errors = match.groups()
    return float(p50), float(p95), float(rate), int(errors)


def report(title: str, results: dict[str, tuple], trivial: str) -> None:
    base = results[trivial]
    print(title)
    print(f"  {'endpoint':<26}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>8}{'errors':>8}"
          f"{'p50 ×':>8}{'p95 ×':>8}{'req/s ×':>9}")  # fmt: skip
    for name, (p50, p95, rate, errors) in results.items():
        print(
            f"  {name:<26}{p50 * 1e3:9.1f}{p95 * 1e3:9.1f}{rate:8.0f}{errors:8d}"
            f"{p50 / base[0]:8.2f}{p95 / base[1]:8.2f}{rate / base[2]:9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "bench16k.db")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install wrk")
    from saescope.db.engine import has_current_schema

    if not args.db.exists() or not has_current_schema(args.db):
        args.db.unlink(missing_ok=True)
        build_database(args.db)
    with tempfile.TemporaryDirectory() as tmp, served(args.db) as base:
        script = Path(tmp) / "random.lua"
        script.write_text(wrk_script(N_FEATURES))
        shares = np.array_split(np.arange(args.clients), len(ENDPOINTS))
        running = {
            name: wrk(base, path, len(share), args.seconds, script, seed)
            for seed, ((name, path), share) in enumerate(
                zip(ENDPOINTS.items(), shares, strict=True)
            )
        }
        mixed = {name: result(process) for name, process in running.items()}
        alone = {}
        for name in [TRIVIAL, *(name for name in ENDPOINTS if name != TRIVIAL), TRIVIAL]:
            process = wrk(base, ENDPOINTS[name], args.clients, args.seconds, script, 7)
            alone[name if name not in alone else "trivial again"] = result(process)
    print(f"{args.clients} connections on loopback, {args.seconds:.0f} s per run, "
          f"{N_FEATURES} features")  # fmt: skip
    report("mixed: every endpoint in one run", mixed, TRIVIAL)
    report("one endpoint at a time", alone, TRIVIAL)


if __name__ == "__main__":
    main()
