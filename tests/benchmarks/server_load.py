"""Server latency under load: feature pages and JSON, token and corpus search and table pages
against a trivial endpoint, without an inference process, with one, and with a hung one.

Builds (once, cached at --db, its SAE kept beside it in DB.sae for the inference process) a
database of 16,384 features with the embedded demo model and an SAE of random directions,
serves it with `python -m saescope.server` in a subprocess, and loads it with wrk (Debian's
`wrk`, a C client, so the load generator takes little of the two cores), requesting random
features, tokens, corpus phrases (each found in the corpus) and table pages:
  - mixed, in one run: a wrk process per endpoint at once, 32 connections in all (the feature
    page, the feature JSON, the token search, the corpus search, the feature table's pages,
    /api/v1/health), so all are measured side by side under the same load; three times, each
    on a fresh server: without an inference process (the corpus search lists the stored
    latents), with `saescope infer DB` connected (--inference-url; the corpus search's latents
    are computed by it, at most 2 calls at once, the rest falling back to the stored ones), and
    with a hung one (a TCP server on 127.0.0.1 that accepts connections and never answers);
  - one endpoint at a time, without an inference process: 32 connections on each in turn, the
    trivial one first and last (to see drift), which shows each endpoint's own saturated cost;
  - the hung inference process alone: 32 connections of corpus search for 15 s (each call to
    it waits until the dashboard's timeout; beyond 2 in flight the search falls back at once)
    beside 4 on /api/v1/health, whose p95 the issue wants at 100 ms or less; and as a control,
    the same load without an inference process.
Prints, per run, each endpoint's p50, p95, throughput, non-2xx answers and socket errors
(timeouts at wrk's 10 s included; a timed-out request has no latency, and one still unanswered
when the run ends is neither timed nor counted), as ratios to the trivial endpoint, with the
trivial endpoint's p95 in the title; for the corpus search, how many answers had computed
latents; and what the dashboard's process did meanwhile (CPU cores, its threads, the calls open
to the inference process, sampled every 0.2 s).

    python tests/benchmarks/server_load.py --db /tmp/bench16k.db
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

N_FEATURES = 16_384
SAE_NAME = "bench"
TRIVIAL = "trivial (/api/v1/health)"
CORPUS = "corpus search"
# Each path is completed per request: `{feature}` by a random feature, `{cursor}` by a random
# feature-table cursor, `{token}` by a random token of SEARCHED, `{phrase}` by one of PHRASES.
ENDPOINTS = {
    TRIVIAL: "/api/v1/health",
    "feature page": f"/saes/{SAE_NAME}/features/{{feature}}",
    "feature JSON": f"/api/v1/saes/{SAE_NAME}/features/{{feature}}",
    "token search": f"/saes/{SAE_NAME}/search?token={{token}}",
    CORPUS: f"/saes/{SAE_NAME}/corpus?phrase={{phrase}}",
    "table page": f"/saes/{SAE_NAME}?after={{cursor}}",
}
SEARCHED = ["def", "%20the", "(", "return", "%20of", "self", "%0A", "x", "The", "%20a"]
# Phrases of the demo's held-out corpus (checked against the database before each run), common
# and rare, so pages of 20 contexts and of a few.
PHRASES = [
    "the",
    "return",
    "self",
    "import",
    "None",
    "value",
    "string",
    "file",
    "error",
    "%20of%20",
]
# The connections on /api/v1/health beside the corpus search in the hung run.
HUNG_HEALTH_CONNECTIONS = 4
HEALTH_TARGET_SECONDS = 0.100
# wrk prints one RESULT line: p50, p95 (seconds), requests/s, socket errors (timeouts included),
# non-2xx answers, answers with computed latents (corpus search pages), requests. A request still
# unanswered when the run ends is neither timed nor counted.
_WRK_SCRIPT = """
local template = os.getenv("PREFIX")
local tokens = {TOKENS}
local phrases = {PHRASES}
local scan = template:find("/corpus", 1, true) ~= nil
local threads = {}
math.randomseed(tonumber(os.getenv("SEED")))
non2xx = 0
computed = 0
setup = function(thread)
  table.insert(threads, thread)
end
request = function()
  local feature = math.random(0, LAST)
  local path = template:gsub("{feature}", feature):gsub("{cursor}", feature .. ":" .. feature)
  path = path:gsub("{token}", function() return tokens[math.random(#tokens)] end)
  path = path:gsub("{phrase}", function() return phrases[math.random(#phrases)] end)
  return wrk.format("GET", path)
end
response = function(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
  if scan and body and body:find('latents-source">computed', 1, true) then
    computed = computed + 1
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.timeout
  local failed, found = 0, 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("non2xx")
    found = found + thread:get("computed")
  end
  io.write(string.format("RESULT %f %f %f %d %d %d %d\\n", latency:percentile(50) / 1e6,
    latency:percentile(95) / 1e6, summary.requests / (summary.duration / 1e6), errors, failed,
    found, summary.requests))
end
"""


class Result(NamedTuple):
    p50: float  # seconds
    p95: float
    rate: float  # requests per second
    errors: int  # socket errors: connect, read, write, timeout (wrk's --timeout)
    non_2xx: int
    computed: int  # answers whose corpus-search latents were computed by the inference process
    requests: int


def wrk_script(n_features: int) -> str:
    """The Lua script of wrk requests over features 0 .. n_features − 1."""

    def table(items: list[str]) -> str:
        return "{" + ", ".join(f'"{item}"' for item in items) + "}"

    return (
        _WRK_SCRIPT.replace("LAST", str(n_features - 1))
        .replace("{TOKENS}", table(SEARCHED))
        .replace("{PHRASES}", table(PHRASES))
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    """Until `url` answers; exits if the process ends or the time runs out first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{' '.join(map(str, process.args))} did not answer on {url}")
            time.sleep(0.2)


@contextmanager
def serving(db: Path, inference_url: str | None = None) -> Iterator[tuple[str, int]]:
    """`python -m saescope.server DB` on a free port (connected to the inference process at
    `inference_url`, if given), until the block ends; yields its URL and process id."""
    port = free_port()
    command = [sys.executable, "-m", "saescope.server", str(db), "--port", str(port)]
    if inference_url is not None:
        command += ["--inference-url", inference_url]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/api/v1/health", server, 20)
        yield base, server.pid
    finally:
        server.terminate()
        server.wait()


@contextmanager
def served(db: Path) -> Iterator[str]:
    """`python -m saescope.server DB` on a free port, until the block ends; yields its URL."""
    with serving(db) as (base, _):
        yield base


@contextmanager
def inference_process(db: Path, log: Path) -> Iterator[tuple[str, int]]:
    """`saescope infer DB` on a free port, as a user starts it (its stderr to `log`), until
    the block ends; yields its URL and process id."""
    port = free_port()
    command = [sys.executable, "-m", "saescope.cli", "infer", str(db), "--port", str(port)]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", process, 120)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait()


@contextmanager
def hung_inference() -> Iterator[str]:
    """A process on 127.0.0.1 that accepts every connection and never answers (it holds each
    one open, unread, until the block ends); yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def check_phrases(base: str, source: str) -> None:
    """Each phrase occurs in the corpus, and the corpus search lists `source` latents (which
    also loads the model and SAE into an inference process before a run)."""
    for phrase in PHRASES:
        url = f"{base}/api/v1/saes/{SAE_NAME}/corpus?phrase={phrase}"
        with urllib.request.urlopen(url, timeout=120) as response:
            found = json.load(response)
        if not found["sequences"] or found["latents_source"] != source:
            sys.exit(
                f"corpus search for {phrase!r}: {found['sequences']} sequences, latents "
                f"{found['latents_source']} (wanted {source}): {found['latents_note']}"
            )


class Watch:
    """Samples every 0.2 s, while the block lasts, processes' CPU time, the dashboard's threads
    (how many are runnable) and its connections open to the inference process's port."""

    def __init__(self, dashboard: int, inference_url: str | None, **others: int) -> None:
        self.pids = {"dashboard": dashboard, **others}
        self.port = None if inference_url is None else int(inference_url.rsplit(":", 1)[1])
        self.samples: list[tuple[int, int, int]] = []  # threads, runnable, calls open
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Watch:
        self.started = time.monotonic()
        self.cpu = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()
        wall = time.monotonic() - self.started
        self.cores = {
            name: (_cpu_seconds(pid) - self.cpu[name]) / wall for name, pid in self.pids.items()
        }

    def _sample(self) -> None:
        pid = self.pids["dashboard"]
        while not self.stop.wait(0.2):
            try:
                states = [_state(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            self.samples.append((len(states), states.count("R"), self._calls_open()))

    def _calls_open(self) -> int:
        """Established TCP connections to the inference process's port (the dashboard's)."""
        if self.port is None:
            return 0
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
        return sum(row[3] == "01" and int(row[2].split(":")[1], 16) == self.port for row in rows)

    def summary(self) -> str:
        threads, runnable, calls = (np.array(column) for column in zip(*self.samples, strict=True))
        cores = ", ".join(f"{name} {value:.2f}" for name, value in self.cores.items())
        line = (
            f"  CPU cores used: {cores}; dashboard threads {threads.max()} (runnable: mean "
            f"{runnable.mean():.1f}, max {runnable.max()})"
        )
        if self.port is not None:
            line += (
                f"; calls open to the inference process: mean {calls.mean():.1f}, max {calls.max()}"
            )
        return line


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process, its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _state(pid: int, tid: str) -> str:
    return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def sae_directory(db: Path) -> Path:
    """Where the SAE of the database at `db` is kept: its build records it, and the inference
    process loads it from there."""
    return db.with_name(f"{db.name}.sae")


def build_database(path: Path) -> None:
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saescope.cli import app
    from saescope.pipeline.demo.builder import DEMO_HOOK, DEMO_MODEL, HELD_OUT_TOKENS
    from saescope.pipeline.models import activations_at_hook, load_model

    directory = sae_directory(path).resolve()
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
        sample = torch.from_numpy(np.load(tokens)[:8].astype(np.int64))
        x = activations_at_hook(model, DEMO_HOOK, sample)
        pre = (x.reshape(-1, 128) - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, 0.995, dim=0))
    sae.save_model(directory)
    app(
        ["build", "--model", str(DEMO_MODEL), "--hook", DEMO_HOOK, "--sae", str(directory),
         "--corpus", str(tokens), "--out", str(path), "--name", SAE_NAME, "--n-tokens", "32768",
         "--eval-sequences", "8", "--quiet"],
        standalone_mode=False,
    )  # fmt: skip


def wrk(base: str, path: str, connections: int, seconds: float, script: Path, seed: int):
    """Starts wrk against one endpoint; returns the process (read with `result`)."""
    environment = {**os.environ, "PREFIX": path, "SEED": str(seed)}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "10s",
               "-s", str(script), base]  # fmt: skip
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)


def measured(process: subprocess.Popen) -> Result:
    output = process.communicate()[0]
    match = re.search(r"RESULT (\S+) (\S+) (\S+) (\d+) (\d+) (\d+) (\d+)", output)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    p50, p95, rate, *counts = match.groups()
    return Result(float(p50), float(p95), float(rate), *map(int, counts))


def result(process: subprocess.Popen) -> tuple[float, float, float, int]:
    """p50, p95, requests/s, and errors: socket errors and non-2xx answers together."""
    run = measured(process)
    return run.p50, run.p95, run.rate, run.errors + run.non_2xx


def mixed(base: str, script: Path, endpoints: dict[str, str], shares: list[int], seconds: float):
    """A wrk process per endpoint at once, with `shares` connections each; their results."""
    running = {
        name: wrk(base, path, share, seconds, script, seed)
        for seed, ((name, path), share) in enumerate(zip(endpoints.items(), shares, strict=True))
    }
    return {name: measured(process) for name, process in running.items()}


def report(title: str, results: dict[str, Result], trivial: str, watch: Watch | None = None):
    base = results[trivial]
    print(f"{title}: health p95 {base.p95 * 1e3:.1f} ms")
    print(f"  {'endpoint':<26}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>8}{'non-2xx':>8}{'errors':>7}"
          f"{'p50 ×':>7}{'p95 ×':>7}{'req/s ×':>8}  latents computed")  # fmt: skip
    for name, run in results.items():
        computed = f"{run.computed}/{run.requests}" if name == CORPUS else ""
        print(
            f"  {name:<26}{run.p50 * 1e3:9.1f}{run.p95 * 1e3:9.1f}{run.rate:8.0f}"
            f"{run.non_2xx:8d}{run.errors:7d}{run.p50 / base.p50:7.2f}{run.p95 / base.p95:7.2f}"
            f"{run.rate / base.rate:8.2f}  {computed}"
        )
    if watch is not None:
        print(watch.summary())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "bench16k.db")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--hung-seconds", type=float, default=15.0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install wrk")
    from saescope.db.engine import has_current_schema

    if not (args.db.exists() and has_current_schema(args.db) and sae_directory(args.db).is_dir()):
        args.db.unlink(missing_ok=True)
        build_database(args.db)
    shares = [len(share) for share in np.array_split(np.arange(args.clients), len(ENDPOINTS))]
    hung_endpoints = {TRIVIAL: ENDPOINTS[TRIVIAL], CORPUS: ENDPOINTS[CORPUS]}
    hung_shares = [HUNG_HEALTH_CONNECTIONS, args.clients]
    runs: list[tuple[str, dict[str, Result], Watch]] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "random.lua"
        script.write_text(wrk_script(N_FEATURES))
        with serving(args.db) as (base, pid):
            check_phrases(base, "stored")
            with Watch(pid, None) as watch:
                results = mixed(base, script, ENDPOINTS, shares, args.seconds)
            runs.append(("mixed, no inference process", results, watch))
            alone = {}
            for name in [TRIVIAL, *(name for name in ENDPOINTS if name != TRIVIAL), TRIVIAL]:
                process = wrk(base, ENDPOINTS[name], args.clients, args.seconds, script, 7)
                alone[name if name not in alone else "trivial again"] = measured(process)
            with Watch(pid, None) as control_watch:  # the hung run's load, no inference process
                control = mixed(base, script, hung_endpoints, hung_shares, args.hung_seconds)
        log = Path(tmp) / "infer.log"
        with (
            inference_process(args.db, log) as (url, inference_pid),
            serving(args.db, url) as (base, pid),
        ):
            check_phrases(base, "computed")  # also loads the model and the SAE
            with Watch(pid, url, inference=inference_pid) as watch:
                results = mixed(base, script, ENDPOINTS, shares, args.seconds)
            runs.append(("mixed, with `saescope infer` connected", results, watch))
        with hung_inference() as url, serving(args.db, url) as (base, pid):
            with Watch(pid, url) as watch:
                results = mixed(base, script, ENDPOINTS, shares, args.seconds)
            runs.append(("mixed, with a hung inference process", results, watch))
        with (
            hung_inference() as url,
            serving(args.db, url) as (base, pid),
            Watch(pid, url) as watch,
        ):
            hung = mixed(base, script, hung_endpoints, hung_shares, args.hung_seconds)
    print(f"{args.clients} connections on loopback, {args.seconds:.0f} s per run, "
          f"{N_FEATURES} features")  # fmt: skip
    for title, results, watch in runs:
        report(title, results, TRIVIAL, watch)
    report("one endpoint at a time, no inference process", alone, TRIVIAL)
    load = (
        f"{args.clients} connections of corpus search and {HUNG_HEALTH_CONNECTIONS} of health "
        f"for {args.hung_seconds:.0f} s"
    )
    report(f"hung inference process: {load}", hung, TRIVIAL, watch)
    report(f"the same load without an inference process: {load}", control, TRIVIAL, control_watch)
    health = hung[TRIVIAL]
    verdict = "met" if health.p95 <= HEALTH_TARGET_SECONDS else "not met"
    print(
        f"health with a hung inference process: p50 {health.p50 * 1e3:.1f} ms, p95 "
        f"{health.p95 * 1e3:.1f} ms, {health.non_2xx} non-2xx, {health.errors} errors; "
        f"target p95 ≤ {HEALTH_TARGET_SECONDS * 1e3:.0f} ms: {verdict}"
    )


if __name__ == "__main__":
    main()
