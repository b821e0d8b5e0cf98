"""Page weight and load time in a real browser (Debian's Chromium, headless, on loopback): for
the index, a feature table page and a feature page of a database, the bytes a cold load
transfers (every resource the page requests, as the server sends it to a client that accepts
gzip) and the load time cold and warm (a second visit, with the browser's cache). Targets: a
cold feature page ≤ 1.5 MB, a warm one ≤ 300 ms.

    python tests/benchmarks/page_weight.py data/demo/demo.db [--sae demo-topk --feature 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from server_load import served

logger = logging.getLogger("page_weight")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
LOAD_TIME = "() => performance.getEntriesByType('navigation')[0].loadEventEnd"


def transferred(url: str) -> int:
    """Bytes the server sends for `url` to a client that accepts gzip."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request) as response:
        return len(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path)
    parser.add_argument("--sae", default="demo-topk")
    parser.add_argument("--feature", type=int, default=2)
    parser.add_argument("--visits", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from playwright.sync_api import sync_playwright

    pages = {
        "index": "/",
        "feature table": f"/saes/{args.sae}",
        "feature page": f"/saes/{args.sae}/features/{args.feature}",
    }
    report = {}
    with served(args.database) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        for name, path in pages.items():
            cold, warm, weight = [], [], 0
            for _ in range(args.visits):
                context = browser.new_context()
                page = context.new_page()
                requested: list[str] = []
                page.on("request", lambda request, seen=requested: seen.append(request.url))
                page.goto(base + path, wait_until="load")
                cold.append(page.evaluate(LOAD_TIME))
                weight = sum(transferred(url) for url in requested)
                page.goto(base + path, wait_until="load")
                warm.append(page.evaluate(LOAD_TIME))
                context.close()
            report[name] = {
                "cold_bytes": weight,
                "cold_ms": sorted(cold)[len(cold) // 2],
                "warm_ms": sorted(warm)[len(warm) // 2],
            }
            logger.info(
                "%s: cold %.2f MB in %.0f ms, warm %.0f ms (medians of %d visits)",
                name, weight / 1e6, report[name]["cold_ms"], report[name]["warm_ms"], args.visits,
            )  # fmt: skip
        browser.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
