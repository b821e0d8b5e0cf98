"""The Neuronpedia export loaded the way Neuronpedia loads it, into its schema on a real
PostgreSQL (Debian's `postgresql`; skipped, saying why, where none can be started).

The loader reproduces Neuronpedia's import (hijohnnylin/neuronpedia, `apps/webapp/app/api/admin/
import/route.ts` and `apps/webapp/lib/db/import.ts`): `model.jsonl`, `sourceset.jsonl` and
`source.jsonl` each created with Prisma's `create({data: line})` (every key must be a column;
`createdAt`/`updatedAt` read as dates; skipped where the row exists), then each features,
activations and explanations file through `importJsonlString`:

    const firstLine = jsonlData.trim().split('\\n')[0];
    const availableColumns = Object.keys(JSON.parse(firstLine));
    SELECT column_name, CASE WHEN data_type = 'ARRAY' THEN udt_name::regtype::text || '[]'
      WHEN data_type = 'USER-DEFINED' THEN (SELECT t.typname::text FROM pg_type t
      WHERE t.typname = c.udt_name) ELSE data_type END as data_type
      FROM information_schema.columns c WHERE table_name = $1 AND column_name = ANY($2)
      ORDER BY ordinal_position;
    INSERT INTO "${tableName}" (${columnList})
      SELECT ${columnList} FROM jsonb_to_recordset($1::jsonb) as t(${columnDefs})
      ON CONFLICT DO NOTHING
    (in chunks of 65,000 lines, `[${chunk.join(',')}]`)

The schema is `neuronpedia_schema.sql` beside this file (its Prisma schema's tables). The
database holds what Neuronpedia seeds or configures before any import: its bot user (prisma/
seed.ts) and the `human` explanation type.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from saescope.cli import app
from saescope.db.explanations import ExplanationStore, explanations_path
from saescope.db.export import NEURONPEDIA_BOT
from saescope.server.app import create_app
from saescope.server.settings import Settings

SCHEMA = Path(__file__).parent / "neuronpedia_schema.sql"
COLUMN_QUERY = """
SELECT column_name,
  CASE WHEN data_type = 'ARRAY' THEN udt_name::regtype::text || '[]'
       WHEN data_type = 'USER-DEFINED' THEN (
         SELECT t.typname::text FROM pg_type t WHERE t.typname = c.udt_name)
       ELSE data_type END as data_type
FROM information_schema.columns c
WHERE table_name = %s AND column_name = ANY(%s)
ORDER BY ordinal_position
"""
CHUNK_LINES = 65_000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on a Unix socket: its connection string."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        pytest.skip("no PostgreSQL server here (Debian's postgresql package)")
    bin_dir = initdb[-1].parent
    as_server_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    directory = Path(tempfile.mkdtemp(prefix="saescope-pg-"))
    if as_server_user:  # PostgreSQL refuses to run as root
        shutil.chown(directory, "postgres")
    data, port = directory / "data", _free_port()

    def run(*command: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([*as_server_user, *map(str, command)], capture_output=True, text=True)

    started = run(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres")
    if started.returncode == 0:
        options = f"-k {directory} -p {port} -c listen_addresses=''"
        log = directory / "log"
        started = run(bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "start")
    if started.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"cannot start PostgreSQL: {started.stderr.strip()[-300:]}")
    conninfo = f"host={directory} port={port} user=postgres dbname=postgres"
    try:
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(SCHEMA.read_text())
            connection.execute(
                'INSERT INTO "User" (id, name, bot, admin, "emailUnsubscribeCode") '
                "VALUES (%s, 'bot', true, true, 'unsubscribe-code')",
                (NEURONPEDIA_BOT,),
            )
            connection.execute(
                'INSERT INTO "ExplanationType" (name, "displayName", description, "creatorName", '
                '"creatorId") VALUES (%s, %s, %s, %s, %s)',
                ("human", "Human", "Written by a person.", "bot", NEURONPEDIA_BOT),
            )
        yield conninfo
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "stop")
        shutil.rmtree(directory, ignore_errors=True)


def prisma_create(connection, table: str, line: dict) -> None:
    """`prisma.<table>.create({data: line})` as the import route calls it: every key a column."""
    columns = {
        name
        for (name,) in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,)
        )
    }
    unknown = set(line) - columns
    assert not unknown, f"Prisma's create on {table} rejects unknown fields {sorted(unknown)}"
    names = ", ".join(f'"{name}"' for name in line)
    values = [json.dumps(v) if isinstance(v, dict) else v for v in line.values()]
    placeholders = ", ".join(["%s"] * len(line))
    connection.execute(f'INSERT INTO "{table}" ({names}) VALUES ({placeholders})', values)


def import_jsonl_string(connection, table: str, jsonl: str) -> None:
    """Neuronpedia's importJsonlString (lib/db/import.ts), step for step."""
    jsonl = jsonl.replace("\\u0000", " ")
    if table == "Activation":  # its normalizeActivationJsonlLine
        lines = []
        for line in (line for line in jsonl.strip().split("\n") if line.strip()):
            parsed = json.loads(line)
            if isinstance(parsed.get("zIndices"), list):
                parsed["zKIndices"], parsed["zQIndices"] = parsed["zIndices"][:2]
            lines.append(json.dumps(parsed))
        jsonl = "\n".join(lines)
    available = list(json.loads(jsonl.strip().split("\n")[0]))
    columns = connection.execute(COLUMN_QUERY, (table, available)).fetchall()
    definitions = ", ".join(f'"{name}" {kind}' for name, kind in columns)
    column_list = ", ".join(f'"{name}"' for name, _ in columns)
    query = (
        f'INSERT INTO "{table}" ({column_list}) SELECT {column_list} '
        f"FROM jsonb_to_recordset(%s::jsonb) as t({definitions}) ON CONFLICT DO NOTHING"
    )
    lines = jsonl.strip().split("\n")
    for start in range(0, len(lines), CHUNK_LINES):
        connection.execute(query, ("[" + ",".join(lines[start : start + CHUNK_LINES]) + "]",))


def import_source(conninfo: str, source: Path) -> None:
    """The import route's order for one source directory."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as connection:
        for name, table, key in (
            ("model", "Model", ("id",)),
            ("sourceset", "SourceSet", ("modelId", "name")),
            ("source", "Source", ("modelId", "id")),
        ):
            line = json.loads((source / f"{name}.jsonl").read_text())
            where = " AND ".join(f'"{column}" = %s' for column in key)
            found = connection.execute(
                f'SELECT 1 FROM "{table}" WHERE {where}', [line[column] for column in key]
            ).fetchone()
            if found is None:
                prisma_create(connection, table, line)
        for folder, table in (
            ("features", "Neuron"),
            ("activations", "Activation"),
            ("explanations", "Explanation"),
        ):
            for path in sorted((source / folder).glob("*.jsonl.gz")):
                with gzip.open(path, "rt") as file:
                    import_jsonl_string(connection, table, file.read())


def as_imported(tokens: list[str]) -> list[str]:
    """What the importer stores of tokens: it replaces NUL, which PostgreSQL's text cannot hold,
    by a space."""
    return [token.replace("\x00", " ") for token in tokens]


def test_neuronpedias_importer_loads_every_row_of_the_export(
    postgres: str, dashboard_db: Path, tmp_path: Path
) -> None:
    """Every feature, example (band bounds included) and label is in Neuronpedia's tables after
    its import, with the API's values; a second model's export of the same SAE lands beside
    the first (no id is shared)."""
    import psycopg

    copy = tmp_path / "features.db"  # with an explanation beside it, by `saescope explain`
    shutil.copy(dashboard_db, copy)
    dashboard_db = copy
    ExplanationStore(explanations_path(copy)).write(
        {"sae": "tiny-sae", "feature_index": 9, "llm": "an-llm", "prompt_version": "v",
         "status": "scored", "explanation": "closing brackets", "detection": 0.875,
         "fuzzing": 0.75, "scores": {}, "examples": {}, "created_at": "2026-12-07T00:00:00"}
    )  # fmt: skip
    labels = tmp_path / "labels.sqlite"
    writer = TestClient(create_app(Settings(database=dashboard_db, labels=labels, write_token="t")))
    for index, text in ((9, "brackets"), (4, "opening parentheses")):
        writer.put(
            f"/api/v1/saes/tiny-sae/features/{index}/label",
            json={"label": text, "note": "", "author": "ada"},
            headers={"Authorization": "Bearer t"},
        )
    runner = CliRunner()
    sources = []
    for model in ("tiny-gpt2", "tiny-gpt2-copy"):
        out = tmp_path / model
        result = runner.invoke(app, ["export", str(dashboard_db), "tiny-sae", str(out),
                                     "--labels", str(labels), "--model-id", model])  # fmt: skip
        assert result.exit_code == 0, result.output
        (source,) = (out / "v1").glob("*/*")
        import_source(postgres, source)
        sources.append(source)

    api = TestClient(create_app(Settings(database=dashboard_db)))
    exported = []
    for path in sorted((sources[0] / "activations").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as file:
            exported += [json.loads(line) for line in file]
    with psycopg.connect(postgres) as connection:

        def count(table: str, model: str) -> int:
            query = f'SELECT count(*) FROM "{table}" WHERE "modelId" = %s'
            return connection.execute(query, (model,)).fetchone()[0]

        for model in ("tiny-gpt2", "tiny-gpt2-copy"):
            assert count("Neuron", model) == 64
            assert count("Activation", model) == len(exported)
            assert count("Explanation", model) == 3
        stored = {
            row[0]: row[1:]
            for row in connection.execute(
                'SELECT id, index, tokens, "values", "maxValue", "binMin", "binMax" '
                'FROM "Activation" WHERE "modelId" = %s',
                ("tiny-gpt2",),
            )
        }
        assert sum(row["binMin"] is not None for row in exported) > 0
        for row in exported:
            index, tokens, values, maximum, low, high = stored[row["id"]]
            assert (index, tokens, low, high) == (
                row["index"], as_imported(row["tokens"]), row["binMin"], row["binMax"]
            )  # fmt: skip
            assert values == pytest.approx(row["values"]) and maximum == row["maxValue"]
        for index in (0, 4, 9, 33):
            served = api.get(f"/api/v1/saes/tiny-sae/features/{index}").json()
            frequency, maximum, top_tokens = connection.execute(
                'SELECT frac_nonzero, "maxActApprox", pos_str FROM "Neuron" WHERE "modelId" = %s '
                "AND index = %s",
                ("tiny-gpt2", str(index)),
            ).fetchone()
            assert frequency == pytest.approx(served["frequency"])
            assert maximum == pytest.approx(served["max_activation"])
            assert top_tokens == as_imported([effect["token"] for effect in served["logits_top"]])
            top = [row for row in exported if row["index"] == str(index)]
            top = [row for row in top if row["dataSource"] == "saescope:top"]
            expected = [as_imported(example["tokens"]) for example in served["examples"]["top"]]
            assert [stored[row["id"]][1] for row in top] == expected
        explanations = connection.execute(
            'SELECT index, description, "authorId", "typeName" FROM "Explanation" '
            'WHERE "modelId" = %s ORDER BY index',
            ("tiny-gpt2",),
        ).fetchall()
        assert sorted(explanations, key=str) == sorted([
            ("4", "opening parentheses", NEURONPEDIA_BOT, "human"),
            ("9", "brackets", NEURONPEDIA_BOT, "human"),
            ("9", "closing brackets", NEURONPEDIA_BOT, None),
        ], key=str)  # fmt: skip
        (notes,) = connection.execute(
            'SELECT notes FROM "Explanation" WHERE description = %s', ("closing brackets",)
        ).fetchone()
        assert "detection 0.875, fuzzing 0.750" in notes
