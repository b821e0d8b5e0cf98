"""SAEBench's result files (adamkarvonen/SAEBench, `sae_bench/evals/*/eval_output.py`), read for
`saescope import-results`.

Every eval writes one JSON object per SAE (`{release}_{sae_id}_eval_results.json`):
`eval_type_id` (`core`, `absorption_first_letter`, `sparse_probing`, `autointerp`, …),
`eval_config`, `datetime_epoch_millis`, `eval_result_metrics` ({group: {metric: number}}),
`eval_result_details` (a list: per latent for core, per letter for absorption, per dataset for
sparse probing) and `eval_result_unstructured` (autointerp: {latent: {explanation, score, …}}).
`run_eval`'s return value, one such object under each `{release}_{sae_id}` key, is read too when
it holds one SAE. Core writes -1 for every value it could not compute (NaN, e.g. a dead latent's
consistent-activation heuristic): read here as null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TOOL = "SAEBench"
# Per-latent statistics of core's details, each entry {index, ...}.
CORE_LATENT_FIELDS = (
    "feature_density",
    "consistent_activation_heuristic",
    "encoder_bias",
    "encoder_norm",
    "encoder_decoder_cosine_sim",
    "max_decoder_cosine_sim",
    "max_encoder_cosine_sim",
)


class ResultFileError(ValueError):
    """The file is not a SAEBench result this SAE can take; the message says why."""


@dataclass
class SaeBenchResult:
    eval_type: str
    evaluated_at: str | None
    metrics: dict[str, dict[str, float | None]]
    details: list[Any]
    config: dict[str, Any]
    latents: dict[int, dict[str, Any]]
    """per latent: its values (core's statistics; autointerp's explanation and score)"""


def read_result(path: Path, d_sae: int) -> SaeBenchResult:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultFileError(f"cannot read {path} as JSON: {error}") from None
    if isinstance(data, dict) and "eval_type_id" not in data:
        results = [value for value in data.values() if isinstance(value, dict)]
        if len(results) != 1 or "eval_type_id" not in results[0]:
            raise ResultFileError(
                f"{path} is not a SAEBench result file (no eval_type_id), nor a run's results "
                f"for one SAE (keys: {', '.join(list(data)[:5])})"
            )
        data = results[0]
    if not isinstance(data, dict) or not isinstance(data.get("eval_result_metrics"), dict):
        raise ResultFileError(f"{path} has no eval_result_metrics: not a SAEBench result file")
    eval_type = str(data["eval_type_id"])
    missing = null_marker(eval_type)
    stated = (data.get("sae_cfg_dict") or {}).get("d_sae")
    if stated is not None and int(stated) != d_sae:
        raise ResultFileError(f"{path} is for an SAE of {stated} latents; this one has {d_sae}")
    metrics = {
        str(group): {str(name): missing(value) for name, value in values.items()}
        for group, values in data["eval_result_metrics"].items()
        if isinstance(values, dict)
    }
    details = data.get("eval_result_details") or []
    latents: dict[int, dict[str, Any]] = {}
    if eval_type == "core":
        for entry in details:
            latents[int(entry["index"])] = {
                name: missing(entry[name]) for name in CORE_LATENT_FIELDS if name in entry
            }
        details = []  # all per latent
    elif eval_type == "autointerp":
        for latent, entry in (data.get("eval_result_unstructured") or {}).items():
            latents[int(latent)] = {
                "explanation": entry.get("explanation"),
                "autointerp_score": entry.get("score"),
            }
    outside = [index for index in latents if not 0 <= index < d_sae]
    if outside:
        raise ResultFileError(
            f"{path} has values for latent {outside[0]}, beyond this SAE's {d_sae} latents"
        )
    epoch = data.get("datetime_epoch_millis")
    return SaeBenchResult(
        eval_type=eval_type,
        evaluated_at=(
            datetime.fromtimestamp(epoch / 1000, UTC).isoformat(timespec="seconds")
            if isinstance(epoch, int | float)
            else None
        ),
        metrics=metrics,
        details=details,
        config=data.get("eval_config") or {},
        latents=latents,
    )


def null_marker(eval_type: str):
    """Core writes -1 where a value could not be computed: that is null."""

    def read(value: Any) -> Any:
        return None if eval_type == "core" and value == -1 else value

    return read
