"""The inference process, `saescope infer DB`: runs the model and SAE each SAE of a database was
built from on text a user types, for the dashboard's "test your text" box. The dashboard stays
torch-free and calls this process over HTTP:

    POST /saes/{sae}/activations  {"text": "...", "features": [12, 40], "top": 5,
                                   "max_frequency": 0.1}  (or "token_ids": [...]: as they are)
    → {"tokens": [...], "token_ids": [...], "special": [...],
       "top": [[{"feature_index", "activation"}, ...] per token],
       "features": [{"feature_index", "activations": [per token]}, ...],
       "summary": [{"feature_index", "fires_on", "max_activation", "specificity"}, ...],
       "context_length": 128, "windows": 1}
    POST /saes/{sae}/spans        {"sequences": [{"token_ids", "spans": [[start, end]]}]}
    → {"sequences": [[[{"feature_index", "activation"}, ...] per span] per sequence]}
                                  (the corpus search's)
    POST /saes/{sae}/steer        {"prompt", "features": [{"feature_index", "strength" | "value"}],
                                   "max_new_tokens", "seed", "temperature"}
    → {"prompt_tokens", "default": {"tokens", "token_ids", "text"}, "steered": {...},
       "steered_from"}

A text longer than the model's context runs in overlapping windows (`text_windows`). Every
answer, errors included, is JSON.

Each SAE is loaded on its first request, with the options its build stored (model, hook, SAE
directory or release, dtype, weight processing); SAEs of one model share it.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from saescope.db.activations import (
    MAX_TEXT_TOKENS,
    SUMMARY_LATENTS,
    ActivationRequest,
    Continuation,
    FeatureActivations,
    LatentActivation,
    SequenceSpans,
    SpansActivations,
    SpansRequest,
    SteerAnswer,
    SteeredLatent,
    SteerRequest,
    TextActivations,
    TextLatent,
)
from saescope.db.engine import SchemaMismatchError, check_schema_version, readonly_engine
from saescope.db.models import Feature, Sae
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
    frequency: torch.Tensor
    """[d_sae]: share of the corpus's tokens each latent fires on, as the build measured it"""
    corpus_mean: torch.Tensor
    """[d_sae]: its mean activation over the corpus's tokens, zeros included"""

    @property
    def context_length(self) -> int:
        return int(self.model.cfg.n_ctx)

    @property
    def bos(self) -> int | None:
        bos = self.model.tokenizer.bos_token_id
        return bos if self.prepend_bos else None

    def dense(self, max_frequency: float | None) -> torch.Tensor | None:
        """The latents above `max_frequency`, as a mask (None: no filter)."""
        return None if max_frequency is None else self.frequency > max_frequency


def text_windows(n_tokens: int, context_length: int, bos: int | None) -> list[tuple[int, int, int]]:
    """How a text of `n_tokens` runs in windows of the model's context: (start, kept, end) of each,
    its text tokens start..end, of which kept..end are read from it. The first window is the
    context's first tokens, read whole; each later one starts with BOS (when the model prepends
    one) and overlaps the previous by half a context, so every token is read with at least half
    a context of text before it."""
    if n_tokens <= context_length:
        return [(0, 0, n_tokens)]
    body = context_length - (bos is not None)
    overlap = context_length // 2
    step = body - overlap
    windows = [(0, 0, context_length)]
    while windows[-1][2] < n_tokens:
        kept = windows[-1][2]
        windows.append((kept - overlap, kept, min(kept + step, n_tokens)))
    return windows


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
            self.engine = engine
        except (SchemaMismatchError, SQLAlchemyError) as error:
            raise InputError(f"{database}: {error}") from None

    @functools.cache  # noqa: B019 (one Inference per process)
    def _model(self, name: str, dtype: str, processing: tuple) -> Any:
        return models.load_model(name, self.device, getattr(torch, dtype), dict(processing), True)

    def _firing(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each latent's frequency and mean activation over the corpus, as the build stored."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(Feature.frequency, Feature.mean_activation)
                .join(Sae, Sae.id == Feature.sae_id)
                .where(Sae.name == name)
                .order_by(Feature.feature_index)
            ).all()
        frequency, mean = torch.tensor(rows, dtype=torch.float64, device=self.device).T
        return frequency, frequency * mean

    @functools.cache  # noqa: B019
    def loaded(self, name: str) -> LoadedSae:
        build, _ = self.configs[name]
        source = build.source
        if source.synthetic:
            raise InputError(f"SAE {name!r} was built on synthetic activations: no text to run")
        directory = Path(build.sae) if build.sae else None
        sae = load_sae(
            directory,
            build.sae_release,
            build.sae_id,
            self.device,
            build.dtype,
            build.sae_format,
            source.hook,
        )
        if output_hook(sae) is not None:
            raise InputError(f"SAE {name!r} is a transcoder: the test box reads SAEs only")
        metadata = sae.cfg.metadata.to_dict()
        processing = models.weight_processing_kwargs(metadata, source.weight_processing)
        model = self._model(source.model, build.dtype, tuple((processing or {}).items()))
        frequency, corpus_mean = self._firing(name)
        return LoadedSae(
            model=model,
            sae=sae,
            hook=source.hook,
            prepend_bos=metadata.get("prepend_bos", True),
            vocab=models.vocab_strings(model.tokenizer, model.cfg.d_vocab),
            special_ids=models.special_token_ids(model.tokenizer),
            frequency=frequency,
            corpus_mean=corpus_mean,
        )

    def _check_ids(self, loaded: LoadedSae, ids: list[int]) -> None:
        outside = [i for i in ids if not 0 <= i < len(loaded.vocab)]
        if outside:
            raise InputError(
                f"the vocabulary has token ids 0 to {len(loaded.vocab) - 1}; got {outside[:5]}"
            )

    def _token_ids(self, loaded: LoadedSae, request: ActivationRequest) -> list[int]:
        """The request's token ids as given, or its text tokenized (BOS first where the SAE's
        model prepends it)."""
        if request.token_ids is not None:
            self._check_ids(loaded, request.token_ids)
            return request.token_ids
        tokenizer = loaded.model.tokenizer
        ids = tokenizer(request.text, add_special_tokens=False)["input_ids"]
        if loaded.bos is not None:
            ids = [loaded.bos, *ids]
        return ids

    def _loaded(self, name: str, asked: list[int]) -> LoadedSae:
        if name not in self.configs:
            raise KeyError(name)
        _, d_sae = self.configs[name]
        outside = [i for i in asked if not 0 <= i < d_sae]
        if outside:
            raise InputError(f"SAE {name!r} has latents 0 to {d_sae - 1}; asked for {outside}")
        return self.loaded(name)

    def _windowed(self, loaded: LoadedSae, ids: list[int]) -> tuple[torch.Tensor, int]:
        """The hook's activations on every token of a text of any length (`text_windows`), and
        the number of windows."""
        windows = text_windows(len(ids), loaded.context_length, loaded.bos)
        bos = [] if loaded.bos is None else [loaded.bos]
        rows = [ids[:end] if start == 0 else bos + ids[start:end] for start, _, end in windows]
        x = self._activations(loaded, rows)
        # Each window's tokens read are the last end − kept of its row.
        read = [
            hooked[len(row) - (end - kept) : len(row)]
            for hooked, row, (_, kept, end) in zip(x, rows, windows, strict=True)
        ]
        return torch.cat(read), len(windows)

    def _activations(self, loaded: LoadedSae, rows: list[list[int]]) -> torch.Tensor:
        """The hook's activations on token sequences of any lengths, run as one batch: each
        padded after its end, which changes nothing before it (the model is causal)."""
        length = max(len(row) for row in rows)
        tokens = torch.tensor([row + [0] * (length - len(row)) for row in rows], device=self.device)
        return models.activations_at_hook(loaded.model, loaded.hook, tokens)

    def run(self, name: str, request: ActivationRequest) -> TextActivations:
        with self._lock, torch.inference_mode():
            loaded = self._loaded(name, request.features)
            ids = self._token_ids(loaded, request)
            if len(ids) > MAX_TEXT_TOKENS:
                raise InputError(
                    f"the text is {len(ids)} tokens; at most {MAX_TEXT_TOKENS} are run"
                )
            x, n_windows = self._windowed(loaded, ids)
            counted = torch.tensor([i not in loaded.special_ids for i in ids], device=x.device)
            encoded = encode_text(
                loaded.sae,
                x,
                request.top,
                request.features,
                loaded.dense(request.max_frequency),
                counted,
            )
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
                for values, indices in zip(*encoded.top, strict=True)
            ],
            features=[
                FeatureActivations(feature_index=i, activations=encoded.wanted[:, n].tolist())
                for n, i in enumerate(request.features)
            ],
            summary=text_summary(encoded, loaded.corpus_mean, int(counted.sum())),
            context_length=loaded.context_length,
            windows=n_windows,
        )

    def steer(self, name: str, request: SteerRequest) -> SteerAnswer:
        """The prompt continued without steering and with it (`steered_generation`)."""
        with self._lock, torch.inference_mode():
            loaded = self._loaded(name, [f.feature_index for f in request.features])
            tokenizer = loaded.model.tokenizer
            ids = tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
            if loaded.bos is not None:
                ids = [loaded.bos, *ids]
            if len(ids) + request.max_new_tokens > loaded.context_length:
                raise InputError(
                    f"the prompt is {len(ids)} tokens: with {request.max_new_tokens} more it "
                    f"passes the model's context of {loaded.context_length}"
                )

            def continued(features: list[SteeredLatent]) -> Continuation:
                new = steered_generation(
                    loaded.model, loaded.sae, loaded.hook, ids, features, request
                )
                return Continuation(
                    tokens=[loaded.vocab[i] for i in new],
                    token_ids=new,
                    text=tokenizer.decode(new),
                )

            return SteerAnswer(
                prompt_tokens=[loaded.vocab[i] for i in ids],
                default=continued([]),
                steered=continued(request.features),
                steered_from=len(ids) - 1,
            )

    def spans(self, name: str, request: SpansRequest) -> SpansActivations:
        """Per sequence and span, every latent firing on the span's tokens with its highest
        activation there; the sequences run as they are, in batches."""
        with self._lock, torch.inference_mode():
            loaded = self._loaded(name, [])
            dense = loaded.dense(request.max_frequency)
            answers: list[list[list[LatentActivation]]] = []
            for first in range(0, len(request.sequences), SPAN_BATCH):
                batch = request.sequences[first : first + SPAN_BATCH]
                answers += self._span_batch(loaded, batch, dense)
        return SpansActivations(sequences=answers)

    def _span_batch(
        self, loaded: LoadedSae, sequences: list[SequenceSpans], dense: torch.Tensor | None
    ) -> list[list[list[LatentActivation]]]:
        for sequence in sequences:
            self._check_ids(loaded, sequence.token_ids)
            if len(sequence.token_ids) > loaded.context_length:
                raise InputError(
                    f"a sequence of {len(sequence.token_ids)} tokens is longer than the model's "
                    f"context of {loaded.context_length}"
                )
        x = self._activations(loaded, [sequence.token_ids for sequence in sequences])
        spans = [(n, start, end) for n, s in enumerate(sequences) for start, end in s.spans]
        rows = torch.cat([x[n, start:end] for n, start, end in spans])
        owner = torch.cat(
            [
                torch.full((end - start,), number, device=x.device)
                for number, (_, start, end) in enumerate(spans)
            ]
        )
        best = torch.zeros(len(spans), loaded.sae.W_dec.shape[0], device=x.device)
        for first, f in LatentChunks(loaded.sae, latent_chunk_size(best.shape[1], len(rows)))(rows):
            f = f.float()
            if dense is not None:
                f = f.masked_fill(dense[first : first + f.shape[1]], 0.0)
            best[:, first : first + f.shape[1]].index_reduce_(0, owner, f, "amax")
        found = iter(best.cpu())
        return [[_firing(next(found)) for _ in sequence.spans] for sequence in sequences]


def _firing(values: torch.Tensor) -> list[LatentActivation]:
    """The latents with a positive value, strongest first."""
    fired = torch.nonzero(values > 0).squeeze(1)
    order = fired[values[fired].argsort(descending=True, stable=True)]
    return [LatentActivation(feature_index=int(j), activation=float(values[j])) for j in order]


# Spans run through the model at a time.
SPAN_BATCH = 64


@dataclass
class EncodedText:
    top: tuple[list, list]
    """per token, the top latents' values and indices, best first"""
    wanted: torch.Tensor
    """[tokens, asked]: the activations of the latents asked for"""
    fires_on: torch.Tensor
    """[d_sae]: counted tokens each latent fires on"""
    total: torch.Tensor
    """[d_sae]: its summed activation over them"""
    maximum: torch.Tensor
    """[d_sae]: its highest activation on them"""


def encode_text(
    sae,
    x: torch.Tensor,
    top: int,
    features: list[int],
    dense: torch.Tensor | None,
    counted: torch.Tensor,
) -> EncodedText:
    """Per token the `top` latents by activation (dense ones left out), the activations of
    `features`, and each latent's firings over the `counted` tokens: a chunk of latents at a
    time where the SAE is wide."""
    n_tokens, d_sae = x.shape[0], sae.W_dec.shape[0]
    kept = None
    wanted = torch.zeros(n_tokens, len(features), device=x.device)
    asked = torch.tensor(features, dtype=torch.int64, device=x.device)
    fires_on = torch.zeros(d_sae, dtype=torch.int64, device=x.device)
    total = torch.zeros(d_sae, dtype=torch.float64, device=x.device)
    maximum = torch.zeros(d_sae, device=x.device)
    for first, f in LatentChunks(sae, latent_chunk_size(d_sae, n_tokens))(x):
        f = f.float()
        width = slice(first, first + f.shape[1])
        inside = (asked >= first) & (asked < width.stop)
        wanted[:, inside] = f[:, asked[inside] - first]
        if dense is not None:
            f = f.masked_fill(dense[width], 0.0)
        kept = running_top_k(kept, f, first, top)
        read = f[counted]
        fires_on[width] = (read > 0).sum(0)
        total[width] = read.double().sum(0)
        maximum[width] = read.amax(0) if len(read) else 0.0
    values, indices = kept
    return EncodedText((values.tolist(), indices.tolist()), wanted.cpu(), fires_on, total, maximum)


def text_summary(
    encoded: EncodedText, corpus_mean: torch.Tensor, n_counted: int
) -> list[TextLatent]:
    """The latents most specific to the text: mean activation over its counted tokens as a
    multiple of the mean over the corpus; a latent the corpus never saw fire ranks first."""
    fired = torch.nonzero(encoded.fires_on > 0).squeeze(1)
    mean = encoded.total[fired] / max(n_counted, 1)
    base = corpus_mean[fired]
    specificity = torch.where(base > 0, mean / base.clamp_min(1e-300), torch.inf)
    order = specificity.argsort(descending=True, stable=True)[:SUMMARY_LATENTS]
    return [
        TextLatent(
            feature_index=int(fired[n]),
            fires_on=int(encoded.fires_on[fired[n]]),
            max_activation=float(encoded.maximum[fired[n]]),
            specificity=None if torch.isinf(specificity[n]) else float(specificity[n]),
        )
        for n in order.tolist()
    ]


# Requests run at once; the others are answered 503 at once rather than queued for minutes.
MAX_CONCURRENT_RUNS = 2
# The token the dashboard must send (`serve --inference-token`), when set.
TOKEN_VARIABLE = "SAESCOPE_INFERENCE_TOKEN"


def steered_generation(
    model, sae, hook: str, prompt: list[int], features: list[SteeredLatent], request: SteerRequest
) -> list[int]:
    """`request.max_new_tokens` tokens after `prompt`, each from a whole forward pass with the
    activations at `hook` changed from the prompt's last position on: strength × W_dec[i]
    added for a latent given a strength; for one given a value, x + (value − f_i(x))·W_dec[i],
    its activation clamped with the rest of x (the SAE's error included) kept. Greedy at
    temperature 0, else sampled from softmax(logits / temperature) with a generator seeded by
    `request.seed`: the same request gives the same tokens."""
    start = len(prompt) - 1
    decoder = sae.W_dec.detach()
    added = [(f.feature_index, f.strength) for f in features if f.strength is not None]
    clamped = [(f.feature_index, f.value) for f in features if f.value is not None]

    def steer(activation: torch.Tensor, hook) -> torch.Tensor:
        flat = models.flat_heads(activation).clone()
        x = flat[:, start:]
        for index, strength in added:
            x = x + strength * decoder[index].to(x.dtype)
        if clamped:
            encoded = sae.encode(x.to(decoder.dtype))
            for index, value in clamped:
                change = (value - encoded[..., index]).unsqueeze(-1)
                x = x + (change * decoder[index]).to(x.dtype)
        flat[:, start:] = x
        return flat.reshape(activation.shape)

    fwd_hooks = [(hook, steer)] if features else []
    generator = torch.Generator().manual_seed(request.seed)
    tokens = list(prompt)
    device = next(sae.parameters()).device
    for _ in range(request.max_new_tokens):
        batch = torch.tensor([tokens], device=device)
        logits = model.run_with_hooks(batch, return_type="logits", fwd_hooks=fwd_hooks)[0, -1]
        if request.temperature == 0:
            chosen = int(logits.argmax())
        else:
            probabilities = torch.softmax(logits.double().cpu() / request.temperature, -1)
            chosen = int(torch.multinomial(probabilities, 1, generator=generator))
        tokens.append(chosen)
    return tokens[len(prompt) :]


def inference_app(database: Path, device: str, token: str | None = None) -> FastAPI:
    inference = Inference(database, device)
    running = threading.BoundedSemaphore(MAX_CONCURRENT_RUNS)

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if token is not None and (
            scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode())
        ):
            raise HTTPException(401, f"this inference process needs its {TOKEN_VARIABLE}")

    app = FastAPI(
        title="saescope inference",
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(authorized)],
    )

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        # Every answer is JSON, the dashboard reads the message out of it.
        logger.exception("inference failed")
        return JSONResponse(
            {"detail": f"the inference process failed: {type(error).__name__}: {error}"}, 500
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "saes": sorted(inference.configs)}

    def answer(run: Any, sae: str, request: Any) -> Any:
        if not running.acquire(blocking=False):
            raise HTTPException(503, f"busy with {MAX_CONCURRENT_RUNS} requests: try again")
        try:
            return run(sae, request)
        except KeyError:
            raise HTTPException(404, f"no SAE named {sae!r} in {database.name}") from None
        except InputError as error:
            raise HTTPException(422, str(error)) from None
        finally:
            running.release()

    @app.post("/saes/{sae}/activations", response_model=TextActivations)
    def activations(sae: str, request: ActivationRequest) -> TextActivations:
        return answer(inference.run, sae, request)

    @app.post("/saes/{sae}/spans", response_model=SpansActivations)
    def spans(sae: str, request: SpansRequest) -> SpansActivations:
        return answer(inference.spans, sae, request)

    @app.post("/saes/{sae}/steer", response_model=SteerAnswer)
    def steer(sae: str, request: SteerRequest) -> SteerAnswer:
        return answer(inference.steer, sae, request)

    return app
