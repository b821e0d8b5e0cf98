"""The inference process, `saescope infer DB`: runs the model and SAE each SAE of a database was
built from on text a user types, for the dashboard's "test your text" box. The dashboard stays
torch-free and calls this process over HTTP:

    POST /saes/{sae}/activations  {"text": "...", "features": [12, 40], "top": 5}
                                  (or {"token_ids": [...]}: run as they are, as the corpus
                                  search does on stored sequences)
    → {"tokens": [...], "token_ids": [...], "special": [...],
       "top": [[{"feature_index", "activation"}, ...] per token],
       "features": [{"feature_index", "activations": [per token]}, ...]}

Each SAE is loaded on its first request, with the options its build stored (model, hook, SAE
directory or release, dtype, weight processing); SAEs of one model share it.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from saescope.db.activations import (
    MAX_TEXT_TOKENS,
    ActivationRequest,
    FeatureActivations,
    LatentActivation,
    TextActivations,
)
from saescope.db.engine import SchemaMismatchError, check_schema_version, readonly_engine
from saescope.db.models import Sae
from saescope.pipeline import models
from saescope.pipeline.errors import InputError
from saescope.pipeline.precompute.config import BuildConfig
from saescope.pipeline.saes import (
    LatentChunks,
    latent_chunk_size,
    load_sae,
    output_hook,
    running_top_k,
)

logger = logging.getLogger(__name__)


@dataclass
class LoadedSae:
    model: Any
    sae: Any
    hook: str
    prepend_bos: bool
    vocab: list[str]
    special_ids: set[int]


class Inference:
    """The SAEs of one database, loaded on demand, run on text."""

    def __init__(self, database: Path, device: str) -> None:
        self.database = database
        self.device = device
        self._lock = threading.Lock()  # one forward pass at a time: they share the model
        try:
            engine = readonly_engine(database)
            check_schema_version(engine)
            with Session(engine) as session:
                self.configs = {
                    sae.name: (BuildConfig.from_record(sae.config, database), sae.d_sae)
                    for sae in session.scalars(select(Sae))
                }
        except (SchemaMismatchError, SQLAlchemyError) as error:
            raise InputError(f"{database}: {error}") from None

    @functools.cache  # noqa: B019 (one Inference per process)
    def _model(self, name: str, dtype: str, processing: tuple) -> Any:
        return models.load_model(name, self.device, getattr(torch, dtype), dict(processing), True)

    @functools.cache  # noqa: B019
    def loaded(self, name: str) -> LoadedSae:
        build, _ = self.configs[name]
        source = build.source
        if source.synthetic:
            raise InputError(f"SAE {name!r} was built on synthetic activations: no text to run")
        directory = Path(build.sae) if build.sae else None
        sae = load_sae(directory, build.sae_release, build.sae_id, self.device, build.dtype)
        if output_hook(sae) is not None:
            raise InputError(f"SAE {name!r} is a transcoder: the test box reads SAEs only")
        metadata = sae.cfg.metadata.to_dict()
        processing = models.weight_processing_kwargs(metadata, source.weight_processing)
        model = self._model(source.model, build.dtype, tuple((processing or {}).items()))
        return LoadedSae(
            model=model,
            sae=sae,
            hook=source.hook,
            prepend_bos=metadata.get("prepend_bos", True),
            vocab=models.vocab_strings(model.tokenizer, model.cfg.d_vocab),
            special_ids=models.special_token_ids(model.tokenizer),
        )

    @staticmethod
    def _token_ids(loaded: LoadedSae, request: ActivationRequest) -> list[int]:
        """The request's token ids as given, or its text tokenized (BOS first where the SAE's
        model prepends it)."""
        if request.token_ids is not None:
            outside = [i for i in request.token_ids if not 0 <= i < len(loaded.vocab)]
            if outside:
                raise InputError(
                    f"the vocabulary has token ids 0 to {len(loaded.vocab) - 1}; got {outside[:5]}"
                )
            return request.token_ids
        tokenizer = loaded.model.tokenizer
        ids = tokenizer(request.text, add_special_tokens=False)["input_ids"]
        if loaded.prepend_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        return ids

    def run(self, name: str, request: ActivationRequest) -> TextActivations:
        if name not in self.configs:
            raise KeyError(name)
        _, d_sae = self.configs[name]
        outside = [i for i in request.features if not 0 <= i < d_sae]
        if outside:
            raise InputError(f"SAE {name!r} has latents 0 to {d_sae - 1}; asked for {outside}")
        with self._lock, torch.inference_mode():
            loaded = self.loaded(name)
            ids = self._token_ids(loaded, request)
            if len(ids) > MAX_TEXT_TOKENS:
                raise InputError(
                    f"the text is {len(ids)} tokens; at most {MAX_TEXT_TOKENS} are run"
                )
            tokens = torch.tensor([ids], device=self.device)
            x = models.activations_at_hook(loaded.model, loaded.hook, tokens)[0]
            top, wanted = top_and_wanted(loaded.sae, x, request.top, request.features)
        return TextActivations(
            tokens=[loaded.vocab[i] for i in ids],
            token_ids=ids,
            special=[i in loaded.special_ids for i in ids],
            top=[
                [
                    LatentActivation(feature_index=int(j), activation=float(v))
                    for v, j in zip(values, indices, strict=True)
                    if v > 0
                ]
                for values, indices in zip(*top, strict=True)
            ],
            features=[
                FeatureActivations(feature_index=i, activations=wanted[:, n].tolist())
                for n, i in enumerate(request.features)
            ],
        )


def top_and_wanted(
    sae, x: torch.Tensor, top: int, features: list[int]
) -> tuple[tuple[list, list], torch.Tensor]:
    """Per token, the `top` latents by activation (values and indices, best first), and the
    activations of `features`: a chunk of latents at a time where the SAE is wide."""
    n_tokens = x.shape[0]
    kept = None
    wanted = torch.zeros(n_tokens, len(features), device=x.device)
    asked = torch.tensor(features, dtype=torch.int64, device=x.device)
    for first, f in LatentChunks(sae, latent_chunk_size(sae.W_dec.shape[0], n_tokens))(x):
        f = f.float()
        inside = (asked >= first) & (asked < first + f.shape[1])
        wanted[:, inside] = f[:, asked[inside] - first]
        kept = running_top_k(kept, f, first, top)
    values, indices = kept
    return (values.tolist(), indices.tolist()), wanted.cpu()


def inference_app(database: Path, device: str) -> FastAPI:
    inference = Inference(database, device)
    app = FastAPI(title="saescope inference", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "saes": sorted(inference.configs)}

    @app.post("/saes/{sae}/activations", response_model=TextActivations)
    def activations(sae: str, request: ActivationRequest) -> TextActivations:
        try:
            return inference.run(sae, request)
        except KeyError:
            raise HTTPException(404, f"no SAE named {sae!r} in {database.name}") from None
        except InputError as error:
            raise HTTPException(422, str(error)) from None

    return app
