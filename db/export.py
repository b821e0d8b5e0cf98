"""Exports of an SAE's features for other tools (`saescope export`):

- `json`: one file per feature, `OUT/<feature_index>.json`, the API's feature JSON;
- `neuronpedia`: what Neuronpedia's importer reads (its `app/api/admin/import/route.ts` and
  `lib/db/import.ts`), `OUT/v1/<modelId>/<sourceId>/`: `model.jsonl`, `sourceset.jsonl` and
  `source.jsonl` (one row each, Prisma's columns only: the route creates them with Prisma), then
  `features/`, `activations/` and `explanations/batch-N.jsonl.gz`, 1,024 features per file
  (activations: every example of those features). The importer takes each file's column list
  from its first line and inserts with `jsonb_to_recordset … ON CONFLICT DO NOTHING`, so every
  row has every key (null where empty), and each row's id is derived from the model, source,
  feature and example, unique across models and the same when exported again. Rows are created
  by Neuronpedia's default bot user, as its own exports write them; the labels written in the
  dashboard are explanations of its `human` type, their author in the notes; those of
  `saescope explain` follow, their scores in the notes.

And back: `neuronpedia_labels` reads the explanations of a Neuronpedia export (its
`explanations/*.jsonl.gz`) as labels, for `saescope import-labels`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from saescope.db.explanations import ExplanationOut
from saescope.db.models import Sae
from saescope.db.queries.examples import ExampleOut
from saescope.db.queries.feature_detail import FeatureDetail, get_feature
from saescope.db.queries.lookups import sae_row

FORMATS = ("json", "neuronpedia")
NEURONPEDIA_BATCH = 1024
# Neuronpedia's default bot user (its prisma/seed.ts and lib/env.ts DEFAULT_CREATOR_USER_ID):
# the creator of every row its own exporters write.
NEURONPEDIA_BOT = "clkht01d40000jv08hvalcvly"
# The explanation type of text a person wrote (its EXPLANATIONTYPE_HUMAN).
HUMAN_EXPLANATION = "human"


class ExportError(ValueError):
    """The SAE cannot be exported as asked; the message says why."""


def features(session: Session, sae: str) -> Iterator[FeatureDetail]:
    for index in range(sae_row(session, sae).d_sae):
        yield get_feature(session, sae, index)


def export_json(session: Session, sae: str, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for feature in features(session, sae):
        path = out / f"{feature.feature_index}.json"
        path.write_text(feature.model_dump_json())
        count += 1
    return count


def layer_of(hook: str) -> str:
    """The layer a hook reads (`blocks.N.…`): Neuronpedia's source ids start with it."""
    found = re.match(r"blocks\.(\d+)\.", hook)
    if found is None:
        raise ExportError(
            f"hook {hook!r} names no layer (blocks.N.…), and Neuronpedia's source ids start "
            "with the layer"
        )
    return found[1]


def source_set_name(sae: str) -> str:
    """Neuronpedia's source set of the SAE (`saescope-demo-topk`): its layers' sources share it."""
    return "saescope-" + re.sub(r"[^a-z0-9]+", "-", sae.lower()).strip("-")


def model_id(model: str) -> str:
    """Neuronpedia's model id from a hub name (`google/gemma-2-2b` → `gemma-2-2b`). A model read
    from a local directory has no name Neuronpedia knows: give --model-id."""
    if model.startswith(("/", ".")) or Path(model).is_absolute():
        raise ExportError(
            f"the model was read from a local directory ({model}); give --model-id with "
            "Neuronpedia's id for it (e.g. gpt2-small)"
        )
    return re.sub(r"[^a-z0-9.-]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")


def row_id(*parts: object) -> str:
    """A row's id, from what identifies it: unique across models and sources, and the same each
    time it is exported (25 characters, as Neuronpedia's cuids)."""
    return "s" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


def neuronpedia_metadata(detail: Sae, ids: dict[str, str], set_name: str) -> dict[str, dict]:
    """model.jsonl, sourceset.jsonl and source.jsonl: one row each, Prisma columns only."""
    now = datetime.now(UTC).isoformat()
    return {
        "model": {
            "id": ids["modelId"],
            "displayNameShort": ids["modelId"],
            "displayName": ids["modelId"],
            "creatorId": NEURONPEDIA_BOT,
            "dimension": detail.d_in,
            "visibility": "PUBLIC",
            "inferenceEnabled": False,
            "instruct": False,
            # Unknown to the database; Neuronpedia's own converters write 0 too.
            "layers": 0,
            "neuronsPerLayer": 0,
            "owner": "",
            "createdAt": now,
            "updatedAt": now,
        },
        "sourceset": {
            "modelId": ids["modelId"],
            "name": set_name,
            "hasDashboards": True,
            "visibility": "PUBLIC",
            "description": f"{detail.name}: {detail.architecture} SAE, {detail.d_sae} latents, "
            f"exported from saescope",
            "type": "sae",
            "creatorName": "saescope",
            "creatorId": NEURONPEDIA_BOT,
            "urls": [],
            "createdAt": now,
        },
        "source": {
            "id": ids["layer"],
            "modelId": ids["modelId"],
            "setName": set_name,
            "hasDashboards": True,
            "visibility": "PUBLIC",
            "creatorId": NEURONPEDIA_BOT,
            "num_prompts": detail.n_sequences,
            "num_tokens_in_prompt": detail.context_length,
            "notes": f"hook {detail.hook}",
            "createdAt": now,
        },
    }


def neuronpedia_feature(feature: FeatureDetail, ids: dict[str, str], set_name: str) -> dict:
    edges = feature.histogram.edges
    centres = [(low * high) ** 0.5 if low > 0 else high / 2 for low, high in pairwise(edges)]
    return {
        **ids,
        "index": str(feature.feature_index),
        "sourceSetName": set_name,
        "creatorId": NEURONPEDIA_BOT,
        "maxActApprox": feature.max_activation,
        "frac_nonzero": feature.frequency,
        "pos_str": [effect.token for effect in feature.logits_top],
        "pos_values": [effect.logit for effect in feature.logits_top],
        "neg_str": [effect.token for effect in feature.logits_bottom],
        "neg_values": [effect.logit for effect in feature.logits_bottom],
        "freq_hist_data_bar_heights": feature.histogram.counts,
        "freq_hist_data_bar_values": centres,
        "topkCosSimIndices": [n.feature_index for n in feature.neighbours],
        "topkCosSimValues": [n.cosine for n in feature.neighbours],
    }


def neuronpedia_activations(feature: FeatureDetail, ids: dict[str, str]) -> list[dict[str, Any]]:
    """Every example of the feature: its top, quantile-band and bottom examples, every key on
    every row (a band's bounds null outside the bands)."""
    no_band = {"binMin": None, "binMax": None}
    examples: list[tuple[str, ExampleOut, dict]] = [
        ("top", example, no_band) for example in feature.examples.top
    ]
    for band in feature.examples.quantiles:
        bounds = {"binMin": band.lower, "binMax": band.upper}
        examples += [(f"quantile-{band.band}", example, bounds) for example in band.examples]
    examples += [("bottom", example, no_band) for example in feature.examples.bottom]
    rows = []
    for n, (kind, example, bounds) in enumerate(examples):
        values = [0.0 if v != v else v for v in example.activations]  # NaN outside the sequence
        rows.append(
            {
                "id": row_id(ids["modelId"], ids["layer"], feature.feature_index, n),
                **ids,
                "index": str(feature.feature_index),
                "tokens": example.tokens,
                "values": values,
                "maxValue": max(values),
                "maxValueTokenIndex": values.index(max(values)),
                "minValue": min(values),
                "dataIndex": str(example.sequence_index),
                "dataSource": f"saescope:{kind}",
                "creatorId": NEURONPEDIA_BOT,
                **bounds,
            }
        )
    return rows


def neuronpedia_explanation(label: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    by = f"written by {label['author']} in saescope" if label["author"] else "written in saescope"
    return {
        "id": row_id(ids["modelId"], ids["layer"], label["feature_index"], "label"),
        **ids,
        "index": str(label["feature_index"]),
        "description": label["label"],
        "authorId": NEURONPEDIA_BOT,
        "typeName": HUMAN_EXPLANATION,
        "explanationModelName": None,
        "notes": f"{label['note']} ({by})" if label["note"] else by,
    }


def neuronpedia_scored_explanation(explained: ExplanationOut, ids: dict[str, str]) -> dict:
    """An explanation by `saescope explain`, its scores in the notes. No type: Neuronpedia's
    explanation types are its own configuration, and an unknown one fails the whole batch."""
    scores = ", ".join(
        f"{name} {value:.3f}"
        for name, value in (("detection", explained.detection), ("fuzzing", explained.fuzzing))
        if value is not None
    )
    return {
        "id": row_id(
            ids["modelId"], ids["layer"], explained.feature_index, "explain", explained.llm
        ),
        **ids,
        "index": str(explained.feature_index),
        "description": explained.explanation,
        "authorId": NEURONPEDIA_BOT,
        "typeName": None,
        "explanationModelName": None,
        "notes": f"saescope explain with {explained.llm} (delphi's method); {scores} "
        "(balanced accuracy, 0.5 is chance)",
    }


def _write_batch(directory: Path, number: int, rows: list[dict]) -> None:
    if rows:
        directory.mkdir(parents=True, exist_ok=True)
        with gzip.open(directory / f"batch-{number}.jsonl.gz", "wt", compresslevel=5) as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)


def export_neuronpedia(
    session: Session,
    sae: str,
    out: Path,
    labels: list[dict[str, Any]],
    neuronpedia_model_id: str | None = None,
    explained: tuple[ExplanationOut, ...] | list[ExplanationOut] = (),
) -> Path:
    """Writes the export a batch at a time; returns its source directory."""
    detail = sae_row(session, sae)
    ids = {
        "modelId": neuronpedia_model_id or model_id(detail.model),
        "layer": f"{layer_of(detail.hook)}-{source_set_name(sae)}",
    }
    set_name = source_set_name(sae)
    root = out / "v1" / ids["modelId"] / ids["layer"]
    root.mkdir(parents=True, exist_ok=True)
    for name, row in neuronpedia_metadata(detail, ids, set_name).items():
        (root / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    batch, feature_rows, activation_rows = 0, [], []
    for feature in features(session, sae):
        if feature.feature_index // NEURONPEDIA_BATCH != batch:
            _write_batch(root / "features", batch, feature_rows)
            _write_batch(root / "activations", batch, activation_rows)
            batch, feature_rows, activation_rows = batch + 1, [], []
        feature_rows.append(neuronpedia_feature(feature, ids, set_name))
        activation_rows.extend(neuronpedia_activations(feature, ids))
    _write_batch(root / "features", batch, feature_rows)
    _write_batch(root / "activations", batch, activation_rows)
    explanations = [neuronpedia_explanation(label, ids) for label in labels]
    explanations += [
        neuronpedia_scored_explanation(row, ids) for row in explained if row.explanation
    ]
    for number in range(-(-len(explanations) // NEURONPEDIA_BATCH)):
        rows = explanations[number * NEURONPEDIA_BATCH : (number + 1) * NEURONPEDIA_BATCH]
        _write_batch(root / "explanations", number, rows)
    return root


def neuronpedia_explanations(path: Path) -> Iterator[dict[str, Any]]:
    """Every explanation row of a Neuronpedia export: `path` an explanations file (.jsonl or
    .jsonl.gz) or a folder of them, searched recursively."""
    files = sorted(path.rglob("*.jsonl*")) if path.is_dir() else [path]
    for file in files:
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rt") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)


def neuronpedia_labels(path: Path, d_sae: int, max_label: int) -> dict[int, dict[str, str]]:
    """A label (`label`, `note`, `author`) for each latent below `d_sae` that the export explains:
    its best-scored explanation (`scoreV1`), attributed to Neuronpedia, its type, model and
    author, the others counted; a description beyond `max_label` characters is cut there and
    kept whole in the note."""
    by_feature: dict[int, list[dict[str, Any]]] = {}
    for row in neuronpedia_explanations(path):
        index = int(row["index"])
        if 0 <= index < d_sae and str(row.get("description") or "").strip():
            by_feature.setdefault(index, []).append(row)
    labels = {}
    for index, rows in sorted(by_feature.items()):
        best = max(rows, key=lambda row: row.get("scoreV1") or 0.0)
        description = str(best["description"]).strip()
        made_by = [str(part) for part in (best.get("typeName"), best.get("explanationModelName"))]
        source = ", ".join(part for part in made_by if part != "None")
        note = f"Neuronpedia explanation {best.get('id', '')}" + (f" ({source})" if source else "")
        if best.get("scoreV1"):
            note += f", score {best['scoreV1']}"
        if len(rows) > 1:
            note += f"; {len(rows) - 1} other explanation(s) of this latent not imported"
        if len(description) > max_label:
            note = f"{description}\n\n{note}"
            description = description[: max_label - 1] + "…"
        author = f"neuronpedia:{best.get('authorId') or ''}".rstrip(":")
        labels[index] = {"label": description, "note": note, "author": author[:100]}
    return labels
