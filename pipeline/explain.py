"""Explanations of latents and their scores (`saescope explain`), by the method of EleutherAI's
delphi (its default explainer, and its detection and fuzzing scorers), through any
OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, Ollama, OpenRouter, OpenAI).

- Explanation: the latent's stored quantile-band examples (4 from each of 10 bands: delphi's 40
  drawn across deciles), each window with the tokens above 0.3 × the example's max marked
  `<<like this>>` (consecutive ones merged) and a line of those tokens' activations as integers
  0–10 (× 10 / the latent's max, rounded up; at most 10 listed); the answer read from what
  follows `[EXPLANATION]:`. Temperature 0. Activations shown, no chain of thought: delphi's
  defaults.
- Scoring, on examples the explanation was not made from: the latent's top and weakest examples
  (activating) and as many contexts of the stored corpus, of the same length, from sequences
  where the build kept no example of it (non-activating: a latent may still fire there unseen,
  with chance 1 − (1 − frequency)^length, stored beside the scores), shuffled and shown 5 to a
  prompt; the LLM answers a list of 0/1.
  - detection: the texts plain; 1 = the text has the latent.
  - fuzzing: activating texts with their tokens at or above 0.3 × the example's max marked, the
    others with as many random tokens marked as the activating examples have active tokens on
    average (rounded up); 1 = every marked token is right.
  Each score is balanced accuracy (TP/P + TN/N)/2, with precision, recall and F1; an answer that
  is not such a list leaves its examples out of the counts (counted as malformed), never wrong.

The prompts follow delphi's (their instructions, `<<…>>` marks, `Example i:` lines, the
`[EXPLANATION]:` line and the list answer) in this project's own words; PROMPT_VERSION names
them, and a change of wording is a new version (explained again, not mixed with the old).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from tqdm.auto import tqdm

from saescope.db.engine import readonly_engine
from saescope.db.explanations import ExplanationStore
from saescope.db.queries.feature_detail import FeatureDetail, get_feature
from saescope.db.queries.lookups import sae_row, sequence_tokens, vocab
from saescope.pipeline.errors import InputError

logger = logging.getLogger(__name__)

PROMPT_VERSION = "delphi-default/saescope-1"
HIGHLIGHT_FRACTION = 0.3
LISTED_ACTIVATIONS = 10
EXAMPLES_PER_PROMPT = 5
RETRIES = 4
BACKOFF_SECONDS = 1.0

EXPLAINER_SYSTEM = (
    "You study patterns in language. You will read text examples in which some tokens are "
    "marked with delimiters <<like this>>; a run of consecutive marked tokens is marked as one "
    "<<run like this>>. After each example, a line lists how strongly each marked token "
    "activates, from 0 to 10.\n\n"
    "Find what the marked tokens, and the text around them, have in common.\n"
    "- Give one concise description of the pattern, not a list of guesses.\n"
    "- Summarise; do not just repeat the marked tokens. Ignore examples that tell you nothing.\n"
    "- Do not mention the << >> delimiters.\n"
    "- End your answer with a line that starts with [EXPLANATION]: followed by the "
    "description.\n"
)
EXPLAINER_SHOTS = (
    (
        'Example 1:  the cat sat <<on the mat>> and\nActivations: ("on", 6), (" the", 5), '
        '(" mat", 9)\nExample 2:  a book lay <<on the table>> all\nActivations: ("on", 7), '
        '(" the", 5), (" table", 8)',
        "[EXPLANATION]: Prepositional phrases giving where an object rests.",
    ),
    (
        'Example 1:  def load<<(>>path\nActivations: ("(", 9)\nExample 2:  print<<(>>"done'
        '\nActivations: ("(", 8)',
        "[EXPLANATION]: The opening parenthesis of a function call or definition.",
    ),
)
DETECTION_SYSTEM = (
    "You study patterns in language. You will be given the description of a feature of text, "
    'such as "plural nouns" or "text about cooking", and then several numbered text '
    "examples.\n\n"
    "For each example in turn, answer 1 if the example has the feature and 0 if it does not. "
    "Answer with a Python list of 0s and 1s, one per example, and nothing else.\n"
)
FUZZING_SYSTEM = (
    "You study patterns in language. You will be given the description of a feature of text, "
    'such as "plural nouns" or "text about cooking", and then several numbered text examples '
    "in which some tokens are marked with delimiters << >>.\n\n"
    "Some examples are marked wrongly. An example is correct only if every marked token shows "
    "the feature. For each example in turn, answer 1 if it is marked correctly and 0 if it is "
    "not. Answer with a Python list of 0s and 1s, one per example, and nothing else.\n"
)
SCORER_TEMPLATE = "Latent explanation: {explanation}\n\nText examples:\n\n{examples}\n"
DETECTION_SHOTS = (
    (
        'Latent explanation: The word "river".\n\nText examples:\n\nExample 0: down by the '
        "river bank\nExample 1: she opened the window\nExample 2: across the river and into",
        "[1,0,1]",
    ),
)
FUZZING_SHOTS = (
    (
        'Latent explanation: The word "river".\n\nText examples:\n\nExample 0: down by the<< '
        "river>> bank\nExample 1: she<< opened>> the window\nExample 2: across the<< river>> "
        "and into",
        "[1,0,1]",
    ),
)


class LlmError(Exception):
    """The endpoint refuses the requests (bad key, unknown model) or cannot be reached."""


@dataclass
class Window:
    """An example's tokens and the latent's activation on each."""

    tokens: list[str]
    activations: list[float]

    @classmethod
    def of(cls, tokens: list[str], activations: list[float | None]) -> Window:
        kept = [(t, a) for t, a in zip(tokens, activations, strict=True) if a is not None]
        return cls([t for t, _ in kept], [a for _, a in kept])


def marked(tokens: list[str], mark: list[bool]) -> str:
    """The text with each run of consecutive marked tokens between << and >>."""
    parts, inside = [], False
    for token, on in zip(tokens, mark, strict=True):
        if on and not inside:
            parts.append("<<")
        if not on and inside:
            parts.append(">>")
        parts.append(token)
        inside = on
    return "".join(parts) + (">>" if inside else "")


def above(window: Window, strict: bool) -> list[bool]:
    """The tokens above HIGHLIGHT_FRACTION of the example's max (at or above, unless strict)."""
    threshold = HIGHLIGHT_FRACTION * max(window.activations, default=0.0)
    if strict:
        return [a > threshold for a in window.activations]
    return [a >= threshold and a > 0 for a in window.activations]


def explainer_example(window: Window, latent_max: float) -> str:
    """An example for the explainer: the marked text, then the marked tokens' activations."""
    mark = above(window, strict=True)
    listed = [
        f'("{token}", {min(10, max(0, math.ceil(activation * 10 / latent_max)))})'
        for token, activation, on in zip(window.tokens, window.activations, mark, strict=True)
        if on
    ][:LISTED_ACTIVATIONS]
    return f"{marked(window.tokens, mark)}\nActivations: {', '.join(listed)}"


def explainer_messages(windows: list[Window], latent_max: float) -> list[dict[str, str]]:
    examples = "\n".join(
        f"Example {i}: {explainer_example(w, latent_max)}" for i, w in enumerate(windows, 1)
    )
    return _messages(EXPLAINER_SYSTEM, EXPLAINER_SHOTS, f"\n{examples}\n")


def parse_explanation(answer: str) -> str | None:
    found = re.search(r"\[EXPLANATION\]:\s*(.*)", answer, re.DOTALL)
    text = found[1].strip() if found else ""
    return text or None


@dataclass
class Sample:
    text: str
    activating: bool


def detection_samples(positives: list[Window], negatives: list[Window]) -> list[Sample]:
    return [Sample("".join(w.tokens), True) for w in positives] + [
        Sample("".join(w.tokens), False) for w in negatives
    ]


def fuzzing_samples(
    positives: list[Window], negatives: list[Window], rng: random.Random
) -> list[Sample]:
    """Activating examples marked where they fire strongly, the others marked at random on as
    many tokens as an activating example fires on, on average (rounded up)."""
    samples = [Sample(marked(w.tokens, above(w, strict=False)), True) for w in positives]
    n_wrong = math.ceil(
        sum(sum(a > 0 for a in w.activations) for w in positives) / max(len(positives), 1)
    )
    for window in negatives:
        chosen = set(rng.sample(range(len(window.tokens)), min(n_wrong, len(window.tokens))))
        mark = [i in chosen for i in range(len(window.tokens))]
        samples.append(Sample(marked(window.tokens, mark), False))
    return samples


def scorer_messages(
    system: str, shots: tuple, explanation: str, texts: list[str]
) -> list[dict[str, str]]:
    examples = "\n".join(f"Example {i}: {text}" for i, text in enumerate(texts))
    return _messages(
        system, shots, SCORER_TEMPLATE.format(explanation=explanation, examples=examples)
    )


def parse_predictions(answer: str, n: int) -> list[int] | None:
    """The answer's list of n zeros and ones; None where it gives none."""
    found = re.search(r"\[.*?\]", answer, re.DOTALL)
    try:
        values = json.loads(found[0]) if found else None
    except json.JSONDecodeError:
        return None
    if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) for v in values):
        return None
    return [int(v) for v in values]


def classification_scores(results: Iterable[tuple[bool, int | None]]) -> dict[str, Any]:
    """Balanced accuracy (TP/P + TN/N)/2, precision, recall and F1 of (activating, prediction)
    pairs; pairs without a prediction (a malformed answer) are counted apart, not as wrong."""
    results = list(results)
    valid = [(truth, prediction) for truth, prediction in results if prediction is not None]
    tp = sum(truth and p == 1 for truth, p in valid)
    fn = sum(truth and p == 0 for truth, p in valid)
    tn = sum(not truth and p == 0 for truth, p in valid)
    fp = sum(not truth and p == 1 for truth, p in valid)
    positives, negatives = tp + fn, tn + fp
    recall = tp / positives if positives else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    balanced = (recall + (tn / negatives if negatives else 0.0)) / 2
    return {
        "balanced_accuracy": balanced if valid else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "positives": positives,
        "negatives": negatives,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "malformed": len(results) - len(valid),
    }


def _messages(system: str, shots: tuple, user: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}]
    for asked, answered in shots:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return [*messages, {"role": "user", "content": user}]


@dataclass
class ChatClient:
    """An OpenAI-compatible chat endpoint, temperature 0, with retries and backoff on what may
    pass (connection, timeout, rate limit, server error); a refusal (bad key, unknown model,
    bad request) ends the run."""

    url: str
    model: str
    api_key: str | None
    timeout: float = 120.0
    tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        import openai

        self._openai = openai
        self._client = openai.OpenAI(
            base_url=self.url,
            api_key=self.api_key or "not-needed",
            max_retries=0,
            timeout=self.timeout,
        )

    def complete(self, messages: list[dict[str, str]]) -> str:
        openai = self._openai
        passing = (
            openai.APIConnectionError,
            openai.RateLimitError,
            openai.InternalServerError,
        )
        for attempt in range(RETRIES + 1):
            try:
                answer = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0.0
                )
            except passing as error:
                if attempt == RETRIES:
                    raise LlmError(f"{self.url} does not answer: {error}") from None
                time.sleep(BACKOFF_SECONDS * 2**attempt)
                continue
            except openai.APIStatusError as error:
                reason = f"{error.status_code}: {error.message}"
                raise LlmError(f"{self.url} refuses the request ({reason})") from None
            with self._lock:
                self.tokens += answer.usage.total_tokens if answer.usage else 0
            return answer.choices[0].message.content or ""
        raise AssertionError("unreachable")


def _windows(examples: Iterable) -> list[Window]:
    return [Window.of(example.tokens, example.activations) for example in examples]


def non_activating(
    session: Session, sae, feature: FeatureDetail, n: int, length: int, rng: random.Random
) -> list[Window]:
    """Up to n windows of `length` tokens of the corpus (BOS left out) that hold none of the
    positions where the build kept an example of the latent, each at a random place; their
    activations unknown, taken as 0."""
    examples = feature.examples
    shown = [*examples.top, *examples.bottom, *examples.decoder_top]
    shown += [e for band in examples.quantiles for e in band.examples]
    firing: dict[int, list[int]] = {}
    for example in shown:
        firing.setdefault(example.sequence_index, []).append(example.position)
    strings = vocab(session, sae.corpus_id)
    windows: list[Window] = []
    for _ in range(20 * n):  # random places; those on a kept example are drawn again
        if len(windows) == n:
            break
        sequence = rng.randrange(sae.n_sequences)
        (ids,) = sequence_tokens(session, sae.corpus_id, [sequence]).values()
        first = 1 if len(ids) > length else 0  # BOS aside
        start = rng.randrange(first, max(first + 1, len(ids) - length + 1))
        if any(start <= position < start + length for position in firing.get(sequence, [])):
            continue
        tokens = [strings[int(i)] for i in ids[start : start + length]]
        windows.append(Window(tokens, [0.0] * len(tokens)))
    return windows


def explain_latent(
    session: Session, sae, feature_index: int, client: ChatClient, seed: int
) -> dict[str, Any]:
    """One latent's row: explanation, both scores, the examples used."""
    feature = get_feature(session, sae.name, feature_index)
    rng = random.Random(seed * 1_000_003 + feature_index)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    row = {"sae": sae.name, "feature_index": feature_index, "llm": client.model,
           "prompt_version": PROMPT_VERSION, "created_at": now, "explanation": None,
           "detection": None, "fuzzing": None, "scores": {}}  # fmt: skip
    train = _windows(e for band in feature.examples.quantiles for e in band.examples)
    positives = _windows([*feature.examples.top, *feature.examples.bottom])
    if not train or feature.max_activation <= 0:
        return row | {"status": "never fires: nothing to explain", "examples": {}}
    length = max(len(w.tokens) for w in positives)
    negatives = non_activating(session, sae, feature, len(positives), length, rng)
    row["examples"] = {
        "explained_from": [[e.sequence_index, e.position] for b in feature.examples.quantiles
                           for e in b.examples],
        "activating": [[e.sequence_index, e.position]
                       for e in [*feature.examples.top, *feature.examples.bottom]],
        "non_activating": len(negatives),
        "non_activating_may_fire": 1 - (1 - feature.frequency) ** length,
    }  # fmt: skip
    answer = client.complete(explainer_messages(train, feature.max_activation))
    explanation = parse_explanation(answer)
    if explanation is None:
        return row | {"status": "malformed: the answer has no [EXPLANATION]: line"}
    scores = {}
    for name, system, shots, samples in (
        ("detection", DETECTION_SYSTEM, DETECTION_SHOTS, detection_samples(positives, negatives)),
        ("fuzzing", FUZZING_SYSTEM, FUZZING_SHOTS, fuzzing_samples(positives, negatives, rng)),
    ):
        rng.shuffle(samples)
        results: list[tuple[bool, int | None]] = []
        for start in range(0, len(samples), EXAMPLES_PER_PROMPT):
            batch = samples[start : start + EXAMPLES_PER_PROMPT]
            reply = client.complete(
                scorer_messages(system, shots, explanation, [s.text for s in batch])
            )
            predictions = parse_predictions(reply, len(batch)) or [None] * len(batch)
            results += [(s.activating, p) for s, p in zip(batch, predictions, strict=True)]
        scores[name] = classification_scores(results)
    return row | {
        "status": "scored",
        "explanation": explanation,
        "detection": scores["detection"]["balanced_accuracy"],
        "fuzzing": scores["fuzzing"]["balanced_accuracy"],
        "scores": scores,
    }


def explain(
    database: Path,
    sae_name: str,
    latents: list[int] | None,
    client: ChatClient,
    store: ExplanationStore,
    concurrency: int,
    quiet: bool,
    seed: int = 0,
) -> tuple[int, int]:
    """Explains and scores the latents (every one with None) not yet done by this LLM and prompt
    version, `concurrency` at a time, each row stored once its latent is done; (done now, done
    before)."""
    engine = readonly_engine(database)
    with Session(engine) as session:
        sae = sae_row(session, sae_name)
        session.expunge(sae)
    wanted = list(range(sae.d_sae)) if latents is None else latents
    outside = [i for i in wanted if not 0 <= i < sae.d_sae]
    if outside:
        raise InputError(f"SAE {sae_name!r} has latents 0 to {sae.d_sae - 1}; got {outside[0]}")
    done = store.done(sae_name, client.model, PROMPT_VERSION)
    todo = [i for i in wanted if i not in done]
    started = time.monotonic()
    progress = tqdm(total=len(todo), desc="explain", unit="latent", disable=quiet)

    def run(feature_index: int) -> None:
        with Session(engine) as session:
            row = explain_latent(session, sae, feature_index, client, seed)
        store.write(row)
        with progress.get_lock():
            progress.update()
            rate = client.tokens / max(time.monotonic() - started, 1e-9)
            progress.set_postfix(tokens=client.tokens, tokens_per_s=f"{rate:.0f}")

    with progress, ThreadPoolExecutor(max(1, concurrency)) as pool:
        for future in [pool.submit(run, i) for i in todo]:
            future.result()
    return len(todo), len(wanted) - len(todo)


def parse_latents(text: str) -> list[int]:
    """`0-999`, `3,5,9-12`: the latents named, in order, each once."""
    chosen: dict[int, None] = {}
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if found is None:
            raise InputError(f"--latents {text!r}: give indices and ranges, as 0-999 or 3,5,9-12")
        first, last = int(found[1]), int(found[2] or found[1])
        chosen.update(dict.fromkeys(range(first, last + 1)))
    return list(chosen)
