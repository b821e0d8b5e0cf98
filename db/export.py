"""Exports of an SAE's features for other tools (`saescope export`):

- `json`: one file per feature, `OUT/<feature_index>.json`, the API's feature JSON;
- `neuronpedia`: Neuronpedia's export layout, `OUT/v1/<modelId>/<sourceId>/{features,
  activations,explanations}/batch-N.jsonl.gz`, 1,024 rows per file (activations: every example
  of features N·1024 .. N·1024 + 1023), fields following its Neuron, Activation and Explanation
  tables; the labels written in the dashboard are the explanations.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from saescope.db.queries.examples import ExampleOut
from saescope.db.queries.feature_detail import FeatureDetail, get_feature
from saescope.db.queries.saes import get_sae

FORMATS = ("json", "neuronpedia")
NEURONPEDIA_BATCH = 1024
# Neuronpedia's creator and author of rows made here.
CREATOR = "saescope"


def features(session: Session, sae: str) -> Iterator[FeatureDetail]:
    for index in range(get_sae(session, sae).d_sae):
        yield get_feature(session, sae, index)


def export_json(session: Session, sae: str, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for feature in features(session, sae):
        path = out / f"{feature.feature_index}.json"
        path.write_text(feature.model_dump_json())
        count += 1
    return count


def source_id(hook: str, sae: str) -> str:
    """Neuronpedia's source id: the layer, then a set name (`6-saescope-demo-topk`)."""
    layer = re.search(r"blocks\.(\d+)\.", hook)
    name = re.sub(r"[^a-z0-9]+", "-", sae.lower()).strip("-")
    return f"{layer.group(1) if layer else 0}-saescope-{name}"


def model_id(model: str) -> str:
    """Neuronpedia's model id: the model's name, lower case, without its path."""
    return re.sub(r"[^a-z0-9.-]+", "-", Path(model).name.lower()).strip("-")


def neuronpedia_feature(feature: FeatureDetail, ids: dict[str, str]) -> dict[str, Any]:
    edges = feature.histogram.edges
    centres = [(low * high) ** 0.5 if low > 0 else high / 2 for low, high in pairwise(edges)]
    return {
        **ids,
        "index": str(feature.feature_index),
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
        "creatorId": CREATOR,
    }


def neuronpedia_activations(feature: FeatureDetail, ids: dict[str, str]) -> list[dict[str, Any]]:
    """Every example of the feature: its top, quantile-band and bottom examples."""
    examples: list[tuple[str, ExampleOut, dict]] = [
        ("top", example, {}) for example in feature.examples.top
    ]
    for band in feature.examples.quantiles:
        bin_range = {"binMin": band.lower, "binMax": band.upper}
        examples += [(f"quantile-{band.band}", example, bin_range) for example in band.examples]
    examples += [("bottom", example, {}) for example in feature.examples.bottom]
    rows = []
    for n, (kind, example, extra) in enumerate(examples):
        values = [0.0 if v != v else v for v in example.activations]  # NaN outside the sequence
        rows.append(
            {
                "id": f"{ids['layer']}-{feature.feature_index}-{n}",
                **ids,
                "index": str(feature.feature_index),
                "tokens": example.tokens,
                "values": values,
                "maxValue": max(values),
                "maxValueTokenIndex": values.index(max(values)),
                "minValue": min(values),
                "dataIndex": str(example.sequence_index),
                "dataSource": f"saescope:{kind}",
                "creatorId": CREATOR,
                **extra,
            }
        )
    return rows


def neuronpedia_explanation(label: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    return {
        "id": f"{ids['layer']}-{label['feature_index']}-label",
        **ids,
        "index": str(label["feature_index"]),
        "description": label["label"],
        "authorId": label["author"] or CREATOR,
        "typeName": "saescope-label",
        "explanationModelName": None,
        "notes": label["note"],
    }


def _write_batch(directory: Path, number: int, rows: list[dict]) -> None:
    if rows:
        directory.mkdir(parents=True, exist_ok=True)
        with gzip.open(directory / f"batch-{number}.jsonl.gz", "wt", compresslevel=5) as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)


def export_neuronpedia(session: Session, sae: str, out: Path, labels: list[dict[str, Any]]) -> Path:
    """Writes the export a batch at a time; returns its source directory."""
    detail = get_sae(session, sae)
    ids = {"modelId": model_id(detail.model), "layer": source_id(detail.hook, sae)}
    root = out / "v1" / ids["modelId"] / ids["layer"]
    batch, feature_rows, activation_rows = 0, [], []
    for feature in features(session, sae):
        if feature.feature_index // NEURONPEDIA_BATCH != batch:
            _write_batch(root / "features", batch, feature_rows)
            _write_batch(root / "activations", batch, activation_rows)
            batch, feature_rows, activation_rows = batch + 1, [], []
        feature_rows.append(neuronpedia_feature(feature, ids))
        activation_rows.extend(neuronpedia_activations(feature, ids))
    _write_batch(root / "features", batch, feature_rows)
    _write_batch(root / "activations", batch, activation_rows)
    explanations = [neuronpedia_explanation(label, ids) for label in labels]
    for number in range(-(-len(explanations) // NEURONPEDIA_BATCH)):
        rows = explanations[number * NEURONPEDIA_BATCH : (number + 1) * NEURONPEDIA_BATCH]
        _write_batch(root / "explanations", number, rows)
    return root
