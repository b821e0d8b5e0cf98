"""Explanations of latents and their scores (`saescope explain`): a writable SQLite file of their
own beside the read-only features database (`NAME.explanations.sqlite`), like the labels.

One row per latent, LLM and prompt version: the explanation (null where the LLM's answer had no
`[EXPLANATION]:` line: `status` says so), detection and fuzzing scores (balanced accuracy) with
precision, recall, F1 and the counts they come from, the examples used, and the time. A row is
written once its latent is done, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from saescope.db.engine import connect_readonly, like_containing

# The scores an explanation gets, by the columns that keep them; the feature table sorts by each.
SCORES = ("detection", "fuzzing")

SCHEMA = """
create table if not exists explanations (
    sae text not null,
    feature_index integer not null,
    llm text not null,
    prompt_version text not null,
    status text not null,
    explanation text,
    detection real,
    fuzzing real,
    scores text not null,
    examples text not null,
    created_at text not null,
    primary key (sae, feature_index, llm, prompt_version)
)
"""


class ExplanationOut(BaseModel):
    """An explanation as the feature's JSON gives it."""

    feature_index: int

    explanation: str | None = Field(description="null where the LLM gave none")
    llm: str
    detection: float | None = Field(
        description="balanced accuracy of the LLM telling the latent's contexts from others "
        "with this explanation (0.5 is chance)"
    )
    fuzzing: float | None = Field(
        description="balanced accuracy of the LLM telling correctly highlighted contexts from "
        "wrongly highlighted ones (0.5 is chance)"
    )
    created_at: str
    status: str = Field(description="scored, or why not (no explanation in the answer)")
    scores: dict[str, Any] = Field(
        description="per scorer: balanced_accuracy, precision, recall, f1, and the counts "
        "(positives, negatives, tp, tn, fp, fn, malformed answers)"
    )


def explanations_path(database: Path) -> Path:
    return database.with_name(database.name + ".explanations.sqlite")


class ExplanationStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def done(self, sae: str, llm: str, prompt_version: str) -> set[int]:
        """The latents explained already by this LLM with this prompt version."""
        if not self.path.is_file():
            return set()
        with closing(sqlite3.connect(self.path)) as connection:
            connection.execute(SCHEMA)
            rows = connection.execute(
                "select feature_index from explanations where sae = ? and llm = ? and "
                "prompt_version = ?",
                (sae, llm, prompt_version),
            )
            return {index for (index,) in rows}

    def write(self, row: dict[str, Any]) -> None:
        with closing(sqlite3.connect(self.path, timeout=10)) as connection, connection:
            connection.execute(SCHEMA)
            connection.execute(
                "insert or replace into explanations values (:sae, :feature_index, :llm, "
                ":prompt_version, :status, :explanation, :detection, :fuzzing, :scores, "
                ":examples, :created_at)",
                {
                    **row,
                    "scores": json.dumps(row["scores"]),
                    "examples": json.dumps(row["examples"]),
                },
            )

    def of_sae(self, sae: str) -> list[ExplanationOut]:
        return self._read("sae = ?", (sae,))

    def of_feature(self, sae: str, feature_index: int) -> list[ExplanationOut]:
        """The latent's explanations, best detection score first."""
        return self._read("sae = ? and feature_index = ?", (sae, feature_index))

    def best_of_features(self, sae: str, indices: list[int]) -> dict[int, ExplanationOut]:
        """Each listed latent's explanation with the best detection score, where it has one."""
        if not indices:
            return {}
        marks = ", ".join("?" * len(indices))
        best: dict[int, ExplanationOut] = {}
        for explanation in self._read(f"sae = ? and feature_index in ({marks})", (sae, *indices)):
            best.setdefault(explanation.feature_index, explanation)
        return best

    def best_scores(self, sae: str, score: str) -> dict[int, float]:
        """Each scored latent's best `score` (one of SCORES) over its explanations."""
        if score not in SCORES:
            raise ValueError(f"no score named {score!r}")
        rows = self._rows(
            f"select feature_index, max({score}) from explanations where sae = ? and "
            f"{score} is not null group by feature_index",
            (sae,),
        )
        return dict(rows)

    def containing(self, sae: str, text: str) -> list[ExplanationOut]:
        """The SAE's explanations that contain `text` (ignoring case), best scored first."""
        if not text:
            return []
        pattern = like_containing(text)
        return self._read("sae = ? and explanation like ? escape '\\'", (sae, pattern))

    def _read(self, where: str, parameters: tuple) -> list[ExplanationOut]:
        """Rows best detection score first."""
        rows = self._rows(
            "select feature_index, explanation, llm, detection, fuzzing, created_at, status, "
            f"scores from explanations where {where} "
            "order by detection is null, detection desc, created_at desc",
            parameters,
        )
        return [
            ExplanationOut(
                feature_index=index,
                explanation=explanation,
                llm=llm,
                detection=detection,
                fuzzing=fuzzing,
                created_at=created_at,
                status=status,
                scores=json.loads(scores),
            )
            for index, explanation, llm, detection, fuzzing, created_at, status, scores in rows
        ]

    def _rows(self, query: str, parameters: tuple) -> list[tuple]:
        """The query's rows, read-only; none where the file or its table is missing."""
        if not self.path.is_file():
            return []
        try:
            with closing(connect_readonly(self.path)) as connection:
                return connection.execute(query, parameters).fetchall()
        except sqlite3.Error:  # no table yet: nothing explained
            return []
