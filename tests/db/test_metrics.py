"""A per-feature metric is declared once (`db.metrics`): its column, record field, response
fields, sort key and table column are all made from the declaration."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import fields
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from saescope.db.engine import SchemaMismatchError, check_schema_version, readonly_engine
from saescope.db.metrics import METRICS
from saescope.db.models import Feature
from saescope.db.queries.feature_detail import FeatureDetail
from saescope.db.queries.feature_table import FeatureRow, SortKey
from saescope.db.records import FeatureColumns
from saescope.server.app import create_app
from saescope.server.settings import Settings


def test_every_metric_reaches_every_place_its_declaration_names() -> None:
    columns = Feature.__table__.columns
    indexed = {tuple(index.columns.keys()) for index in Feature.__table__.indexes}
    record = {field.name for field in fields(FeatureColumns)}
    for metric in METRICS:
        assert columns[metric.name].nullable == metric.nullable, metric.name
        assert metric.name in record
        assert (metric.name in FeatureRow.model_fields) == (metric.column is not None)
        assert (metric.name in FeatureDetail.model_fields) == (metric.label is not None)
        assert (metric.name in SortKey.__members__) == metric.sortable
        assert (("sae_id", metric.name) in indexed) == metric.sortable
        for model in (FeatureRow, FeatureDetail):
            if metric.name in model.model_fields:
                assert model.model_fields[metric.name].description == metric.definition


def test_the_table_and_the_feature_page_show_every_declared_metric(dashboard_db: Path) -> None:
    client = TestClient(create_app(Settings(database=dashboard_db)))
    table = client.get("/saes/tiny-sae").text
    feature = client.get("/saes/tiny-sae/features/1").text
    for metric in METRICS:
        if metric.column is not None:
            assert f'title="{escape(metric.definition)}"' in table
            assert f">{metric.column}" in table
        if metric.label is not None:
            assert f'<span title="{escape(metric.definition)}">{metric.label}</span>' in feature


def test_a_file_without_a_declared_column_is_refused(dashboard_db: Path, tmp_path: Path) -> None:
    copy = tmp_path / "older.db"
    shutil.copy(dashboard_db, copy)
    with sqlite3.connect(copy) as connection:
        connection.execute("alter table features drop column decoder_auroc")
    with pytest.raises(SchemaMismatchError, match="features table has no decoder_auroc"):
        check_schema_version(readonly_engine(copy))
