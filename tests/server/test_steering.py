"""Steering: the inference process continues a prompt as it is and with latents steered, against
generation written out here with the same model and SAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from saescope.db.activations import SteerRequest
from saescope.pipeline.inference import Inference
from saescope.pipeline.models import load_model, weight_processing_kwargs
from saescope.pipeline.saes import load_sae
from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.conftest import HOOK, TEXT

ROUTE = "/api/v1/saes/tiny-sae/steer"
PROMPT = TEXT[:40]


@pytest.fixture(scope="module")
def inference(dashboard_db: Path) -> Inference:
    return Inference(dashboard_db, "cpu")


@pytest.fixture(scope="module")
def model_and_sae(tiny_model_dir: Path, dashboard_sae_dir: Path):
    sae = load_sae(dashboard_sae_dir, None, None, "cpu", "float32")
    processing = weight_processing_kwargs(sae.cfg.metadata.to_dict(), None)
    return load_model(str(tiny_model_dir), "cpu", torch.float32, processing, quiet=True), sae


def greedy_by_hand(model, sae, prompt: list[int], n: int, change) -> list[int]:
    """n greedy tokens, the activations at the hook replaced by change(x) on every position from
    the prompt's last on."""
    start = len(prompt) - 1

    def hook(activation, hook):
        activation = activation.clone()
        activation[:, start:] = change(activation[:, start:])
        return activation

    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model.run_with_hooks(
                torch.tensor([tokens]), return_type="logits", fwd_hooks=[(HOOK, hook)]
            )
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def steer(inference: Inference, **request):
    return inference.steer("tiny-sae", SteerRequest(prompt=PROMPT, **request))


def test_steering_equals_a_hooked_generation_written_out(inference, model_and_sae) -> None:
    model, sae = model_and_sae
    answer = steer(inference, features=[{"feature_index": 5, "strength": 8.0}], max_new_tokens=8)
    prompt = model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    prompt = [model.tokenizer.bos_token_id, *prompt]
    assert answer.steered_from == len(prompt) - 1
    steered = greedy_by_hand(model, sae, prompt, 8, lambda x: x + 8.0 * sae.W_dec[5])
    default = greedy_by_hand(model, sae, prompt, 8, lambda x: x)
    assert answer.steered.token_ids == steered
    assert answer.default.token_ids == default
    assert steered != default, "a strength of 8 along a decoder row changes this model's text"
    assert answer.steered.text == model.tokenizer.decode(steered)

    def clamp_to_zero(x):
        return x - sae.encode(x)[..., 7:8] * sae.W_dec[7]

    clamped = steer(inference, features=[{"feature_index": 7, "value": 0.0}], max_new_tokens=8)
    assert clamped.steered.token_ids == greedy_by_hand(model, sae, prompt, 8, clamp_to_zero)


def test_no_change_gives_the_default_continuation(inference) -> None:
    """Strength 0 adds nothing, and a clamp to a latent's own activation changes nothing."""
    zero = steer(inference, features=[{"feature_index": 5, "strength": 0.0}], max_new_tokens=10)
    assert zero.steered.token_ids == zero.default.token_ids


def test_seeded_sampling_is_deterministic(inference) -> None:
    request = {"features": [{"feature_index": 5, "strength": 4.0}], "max_new_tokens": 8,
               "temperature": 1.0}  # fmt: skip
    first, again = steer(inference, seed=3, **request), steer(inference, seed=3, **request)
    other = steer(inference, seed=4, **request)
    assert first == again
    assert other.default.token_ids != first.default.token_ids


def test_the_dashboard_route_steers_through_the_inference_process(
    dashboard_db: Path, inference_url: str, inference: Inference
) -> None:
    client = TestClient(create_app(Settings(database=dashboard_db, inference_url=inference_url)))
    body = {"prompt": PROMPT, "features": [{"feature_index": 5, "strength": 8.0}],
            "max_new_tokens": 6}  # fmt: skip
    response = client.post(ROUTE, json=body)
    assert response.status_code == 200, response.text
    direct = steer(inference, features=body["features"], max_new_tokens=6)
    assert response.json() == direct.model_dump()
    for wrong, status, message in (
        ({**body, "features": [{"feature_index": 5, "strength": 1, "value": 2}]}, 422, "either"),
        ({**body, "features": [{"feature_index": 64, "strength": 1}]}, 404, "no latent 64"),
        ({**body, "max_new_tokens": 65}, 422, "less than or equal"),
        ({**body, "prompt": TEXT * 8, "max_new_tokens": 64}, 422, "context"),
    ):
        refused = client.post(ROUTE, json=wrong)
        assert refused.status_code == status, refused.text
        assert message in refused.text
    unconnected = TestClient(create_app(Settings(database=dashboard_db)))
    assert unconnected.post(ROUTE, json=body).status_code == 503
