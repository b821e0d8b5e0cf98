"""Property-based fuzzing of every JSON route from the OpenAPI schema (schemathesis, in process):
no server error, only documented status codes, content types and response schemas. SAE names
are drawn from the real one as well as at random, so the deeper code paths are reached."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from saescope.server.app import create_app
from saescope.server.settings import Settings

SAES = {"sae": "tiny-sae", "other": "other-sae"}
EXAMPLES_PER_ROUTE = 40
# A well-formed request may still be refused (a cursor from another sort is a 400): no check that
# every schema-valid request succeeds.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(dashboard_db: Path, inference_url: str):
    # With the inference process, so that "test your text" answers as it does in use.
    settings = Settings(database=dashboard_db, inference_url=inference_url)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))

    @schema.hook
    def map_path_parameters(context, path_parameters):
        # Two drawn names in three become a real one (the choice follows the drawn name).
        mapped = dict(path_parameters or {})
        for parameter, real in SAES.items():
            name = mapped.get(parameter)
            if name is not None and zlib.crc32(str(name).encode()) % 3:
                mapped[parameter] = real
        return mapped

    return schema


def test_every_route_keeps_its_contract(api_schema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 19
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
        )
        def keeps_its_contract(case) -> None:
            response = case.call_and_validate(checks=CHECKS)
            assert response.status_code < 500

        keeps_its_contract()
