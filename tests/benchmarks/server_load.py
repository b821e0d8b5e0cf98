"""Server latency under load: feature page and feature JSON against a trivial endpoint.

Builds (once, cached at --db) a database of 16,384 features with the embedded demo model and an
SAE of random directions, serves it with uvicorn in a subprocess, and runs 32 concurrent clients
on loopback for --seconds against each endpoint in turn (the trivial one first and last, to see
drift), requesting random features. Prints p50, p95 and throughput as ratios to the trivial
endpoint, and the error count.

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


async def load(base: str, path_for, clients: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def worker(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.get(path_for(rng))
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok

        await asyncio.gather(*(worker(seed) for seed in range(clients)))
    return latencies, errors


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

        endpoints = [
            ("trivial (/api/v1/health)", lambda rng: "/api/v1/health"),
            ("feature page", lambda rng: f"/saes/{SAE_NAME}/features/{feature(rng)}"),
            ("feature JSON", lambda rng: f"/api/v1/saes/{SAE_NAME}/features/{feature(rng)}"),
            ("trivial again", lambda rng: "/api/v1/health"),
        ]
        results = {}
        for name, path_for in endpoints:
            latencies, errors = asyncio.run(load(base, path_for, args.clients, args.seconds))
            results[name] = (np.percentile(latencies, 50), np.percentile(latencies, 95),
                             len(latencies) / args.seconds, errors)  # fmt: skip
    finally:
        server.terminate()
        server.wait()
    trivial = results["trivial (/api/v1/health)"]
    print(f"{args.clients} clients, {args.seconds:.0f} s per endpoint, {N_FEATURES} features")
    print(f"{'endpoint':<26}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>8}{'errors':>8}"
          f"{'p50 ×':>8}{'p95 ×':>8}{'req/s ×':>9}")  # fmt: skip
    for name, (p50, p95, rate, errors) in results.items():
        print(
            f"{name:<26}{p50 * 1e3:9.1f}{p95 * 1e3:9.1f}{rate:8.0f}{errors:8d}"
            f"{p50 / trivial[0]:8.2f}{p95 / trivial[1]:8.2f}{rate / trivial[2]:9.2f}"
        )


if __name__ == "__main__":
    main()
