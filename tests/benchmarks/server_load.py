"""Server latency under load: feature page and feature JSON against a trivial endpoint.

Builds (once, cached at --db) a database of 16,384 features with the embedded demo model and an
SAE of random directions, and serves it with uvicorn in a subprocess. Then 32 concurrent clients
on loopback, requesting random features:
  - mixed: for --seconds, every client cycles through the feature page, the feature JSON and
    the trivial endpoint (/api/v1/health), so all three are measured side by side under the
    same load;
  - one endpoint at a time: --seconds against each in turn (the trivial one first and last, to
    see drift), which shows each endpoint's own saturated cost.
Prints p50, p95 and throughput per endpoint, as ratios to the trivial endpoint, and errors.

    python tests/benchmarks/server_load.py --db /tmp/bench16k.db
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

N_FEATURES = 16_384
SAE_NAME = "bench"


def build_database(path: Path) -> None:
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from pipeline.cli import app
    from pipeline.demo import DEMO_HOOK, DEMO_MODEL, token_file

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        tokens = token_file(directory, held_out=True)
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
            from pipeline import sources

            model = sources.load_model(str(DEMO_MODEL), "cpu", torch.float32, {}, quiet=True)
            x = sources.activations_at_hook(model, DEMO_HOOK, torch.from_numpy(np.load(tokens)[:8]))
            pre = (x.reshape(-1, 128) - sae.b_dec) @ sae.W_enc
            sae.b_enc.copy_(-torch.quantile(pre, 0.995, dim=0))
        sae.save_model(directory / "sae")
        app(
            ["build", "--model", str(DEMO_MODEL), "--hook", DEMO_HOOK, "--sae",
             str(directory / "sae"), "--corpus", str(tokens), "--out", str(path), "--name",
             SAE_NAME, "--n-tokens", "32768", "--eval-sequences", "8", "--quiet"],
            standalone_mode=False,
        )  # fmt: skip


async def load(base: str, paths: dict, clients: int, seconds: float) -> dict[str, tuple]:
    """Each client cycles through `paths` (name → function of a Random giving a path)."""
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    errors = dict.fromkeys(paths, 0)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            names = list(paths)
            turn = seed
            while time.perf_counter() < deadline:
                name = names[turn % len(names)]
                turn += 1
                started = time.perf_counter()
                try:
                    response = await client.get(paths[name](rng))
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies[name].append(time.perf_counter() - started)
                errors[name] += not ok

        await asyncio.gather(*(worker(seed) for seed in range(clients)))
    return {
        name: (
            np.percentile(values, 50),
            np.percentile(values, 95),
            len(values) / seconds,
            errors[name],
        )
        for name, values in latencies.items()
    }


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
    if not args.db.exists():
        build_database(args.db)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "server", str(args.db), "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base}/api/v1/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)

        def feature(rng: random.Random) -> int:
            return rng.randrange(N_FEATURES)

        trivial = "trivial (/api/v1/health)"
        paths = {
            trivial: lambda rng: "/api/v1/health",
            "feature page": lambda rng: f"/saes/{SAE_NAME}/features/{feature(rng)}",
            "feature JSON": lambda rng: f"/api/v1/saes/{SAE_NAME}/features/{feature(rng)}",
        }
        mixed = asyncio.run(load(base, paths, args.clients, args.seconds))
        alone = {}
        for name in [trivial, "feature page", "feature JSON", trivial]:
            result = asyncio.run(load(base, {name: paths[name]}, args.clients, args.seconds))
            alone[name if name not in alone else "trivial again"] = result[name]
    finally:
        server.terminate()
        server.wait()
    print(
        f"{args.clients} clients on loopback, {args.seconds:.0f} s per run, {N_FEATURES} features"
    )
    report("mixed: all three endpoints in one run", mixed, trivial)
    report("one endpoint at a time", alone, trivial)


if __name__ == "__main__":
    main()
