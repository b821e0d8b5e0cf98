"""Page speed of a wide SAE's database against a narrow one's: feature page, feature JSON and
feature-table page p95 under load, each database served in turn (narrow, wide, narrow, wide, so
drift on a shared machine hits both alike), and each file's size per latent.

The databases are those `scale.py --keep DIR` writes (one SAE each, named after its directory):

    python tests/benchmarks/scale.py --widths 4096 262144 --keep /tmp/scale
    python tests/benchmarks/wide_database.py /tmp/scale/4096.db /tmp/scale/262144.db
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from server_load import result, served, wrk, wrk_script

logger = logging.getLogger("wide_database")
PAGES = {
    "feature page": "/saes/{sae}/features/{{feature}}",
    "feature JSON": "/api/v1/saes/{sae}/features/{{feature}}",
    "table page": "/saes/{sae}?after={{cursor}}",
}


def describe(db: Path) -> tuple[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        name, d_sae = connection.execute("select name, d_sae from saes").fetchone()
    return name, d_sae


def p95s(db: Path, clients: int, seconds: float) -> dict[str, float]:
    """p95 latency (s) of each page, one page at a time, `clients` connections each."""
    name, d_sae = describe(db)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp, served(db) as base:
        script = Path(tmp) / "random.lua"
        script.write_text(wrk_script(d_sae))
        for page, template in PAGES.items():
            process = wrk(base, template.format(sae=name), clients, seconds, script, seed=3)
            _, p95, _, errors = result(process)
            if errors:
                sys.exit(f"{errors} errors on {page} of {db}")
            figures[page] = p95
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("narrow", type=Path)
    parser.add_argument("wide", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install wrk")
    runs: dict[Path, list[dict[str, float]]] = {args.narrow: [], args.wide: []}
    for _ in range(args.rounds):
        for db in runs:
            runs[db].append(p95s(db, args.clients, args.seconds))
    report = {}
    for db, figures in runs.items():
        _, d_sae = describe(db)
        best = {page: min(run[page] for run in figures) for page in PAGES}
        size = db.stat().st_size
        report[str(db)] = {"d_sae": d_sae, "p95_seconds": best, "bytes_per_latent": size / d_sae}
        logger.info(
            "%s: %d latents, %.0f MB, %.0f bytes per latent; p95 (best of %d) %s",
            db.name, d_sae, size / 1e6, size / d_sae, args.rounds,
            ", ".join(f"{page} {p95 * 1e3:.0f} ms" for page, p95 in best.items()),
        )  # fmt: skip
    narrow, wide = (report[str(db)]["p95_seconds"] for db in (args.narrow, args.wide))
    for page in PAGES:
        logger.info("%s p95, wide against narrow: %.2f×", page, wide[page] / narrow[page])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
