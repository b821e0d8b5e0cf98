"""Query parameters shared by each page and its JSON twin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query
from pydantic import BeforeValidator, Field
from sqlalchemy.orm import Session

from saescope.db.corpus_text import MIN_PHRASE_CHARACTERS
from saescope.db.explanations import SCORES, ExplanationOut, ExplanationStore
from saescope.db.flags import FlagName
from saescope.db.models import SAE_NAME_MAX_LENGTH, TOKEN_LATENTS
from saescope.db.queries.comparisons import Comparison, UnmatchedSort, compare_saes
from saescope.db.queries.consistency import Consistency, ConsistencySort, consistency
from saescope.db.queries.feature_table import FeaturePage, SortKey, list_features
from saescope.db.queries.paging import MAX_PAGE_SIZE, SortOrder

# An empty form field (`?flag=&min_frequency=`) means no filter.
EmptyIsNone = BeforeValidator(lambda value: None if value == "" else value)
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
PageSize = Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)]
Cursor = Annotated[str, Field(max_length=100)]

SaeName = Annotated[
    str, Path(max_length=SAE_NAME_MAX_LENGTH, description="name of the SAE in the database")
]
OtherSaeName = Annotated[
    str, Path(max_length=SAE_NAME_MAX_LENGTH, description="name of the SAE compared with")
]
FeatureIndex = Annotated[int, Path(ge=0, description="latent index")]
TokenQuery = Annotated[
    str, Query(min_length=1, max_length=200, description="token text to look for")
]
# Token search: matching tokens shown, and latents per token (as many as the build keeps).
SearchLimit = Annotated[
    int | None,
    Query(ge=1, le=MAX_PAGE_SIZE, description="matching tokens to show (default: the setting)"),
]
LatentsPerToken = Annotated[
    int, Query(ge=1, le=TOKEN_LATENTS, description="latents shown per token")
]
MaxFrequency = Annotated[
    Share | None,
    EmptyIsNone,
    Query(
        description="leave out latents firing on more than this share of all tokens (default: "
        "the SAE's high-frequency threshold; 1 keeps every latent)"
    ),
]
PhraseQuery = Annotated[
    str,
    Query(
        min_length=MIN_PHRASE_CHARACTERS,
        max_length=200,
        description="text to find in the corpus, ignoring case",
    ),
]
PhraseLimit = Annotated[int, Query(ge=1, le=100, description="contexts per page")]
PhraseCursor = Annotated[
    str | None,
    Query(
        max_length=100, description="a page's `next_cursor` (after) or `previous_cursor` (before)"
    ),
]
LabelQuery = Annotated[
    str | None, Query(max_length=200, description="text a label or note contains")
]
Threshold = Annotated[
    float,
    Query(
        gt=0, le=1, allow_inf_nan=False, description="flag features firing on more than this share"
    ),
]


class ExplainedFeaturePage(FeaturePage):
    explanations: dict[int, ExplanationOut] = Field(
        description="the best explanation (`saescope explain`) of each latent on the page that "
        "has one"
    )


@dataclass
class FeatureTableParams:
    sort: SortKey
    order: SortOrder
    flag: FlagName | None
    min_frequency: float | None
    max_frequency: float | None
    after: str | None
    limit: int | None
    before: str | None

    def page(
        self, session: Session, sae: str, default_limit: int, explanations: ExplanationStore
    ) -> ExplainedFeaturePage:
        """The page of the feature table these parameters ask for, with the latents'
        explanations."""
        scores = (
            explanations.best_scores(sae, self.sort.value) if self.sort.value in SCORES else None
        )
        page = list_features(
            session, sae, **{**vars(self), "limit": self.limit or default_limit}, scores=scores
        )
        listed = [row.feature_index for row in page.items]
        return ExplainedFeaturePage(
            **dict(page), explanations=explanations.best_of_features(sae, listed)
        )


def feature_table_params(
    sort: Annotated[SortKey, Query(description="column to sort by")] = SortKey.feature_index,
    order: Annotated[SortOrder, Query(description="asc or desc")] = SortOrder.asc,
    flag: Annotated[
        FlagName | None, EmptyIsNone, Query(description="only features with this flag")
    ] = None,
    min_frequency: Annotated[Share | None, EmptyIsNone, Query()] = None,
    max_frequency: Annotated[Share | None, EmptyIsNone, Query()] = None,
    after: Annotated[
        Cursor | None, EmptyIsNone, Query(description="cursor from the previous page")
    ] = None,
    limit: Annotated[PageSize | None, EmptyIsNone, Query()] = None,
    before: Annotated[
        Cursor | None, EmptyIsNone, Query(description="cursor from the next page, to go back")
    ] = None,
) -> FeatureTableParams:
    return FeatureTableParams(sort, order, flag, min_frequency, max_frequency, after, limit, before)


FeatureTableQuery = Annotated[FeatureTableParams, Depends(feature_table_params)]


@dataclass
class ComparisonParams:
    threshold: float
    sort: UnmatchedSort
    order: SortOrder
    after: str | None
    limit: int | None

    def comparison(self, session: Session, sae: str, other: str, default_limit: int) -> Comparison:
        """The comparison, with the page of unmatched latents these parameters ask for."""
        return compare_saes(
            session, sae, other, **{**vars(self), "limit": self.limit or default_limit}
        )


def comparison_params(
    threshold: Annotated[
        Share, Query(description="latents whose best cosine is below it are unmatched")
    ] = 0.5,
    sort: Annotated[
        UnmatchedSort, Query(description="column to sort the unmatched latents by")
    ] = UnmatchedSort.frequency,
    order: Annotated[SortOrder, Query(description="asc or desc")] = SortOrder.desc,
    after: Annotated[
        Cursor | None, EmptyIsNone, Query(description="cursor from the previous page")
    ] = None,
    limit: Annotated[PageSize | None, EmptyIsNone, Query()] = None,
) -> ComparisonParams:
    return ComparisonParams(threshold, sort, order, after, limit)


ComparisonQuery = Annotated[ComparisonParams, Depends(comparison_params)]


@dataclass
class ConsistencyParams:
    runs: list[str]
    reference: list[str]
    threshold: float
    sort: ConsistencySort
    order: SortOrder
    after: str | None
    limit: int | None

    def consistency(self, session: Session, sae: str, default_limit: int) -> Consistency:
        """`sae`'s latents that recur in the other runs but not in the reference, one page."""
        return consistency(
            session,
            [sae, *self.runs],
            self.reference,
            threshold=self.threshold,
            sort=self.sort,
            order=self.order,
            after=self.after,
            limit=self.limit or default_limit,
        )


SaeNames = Annotated[list[str], Field(max_length=16)]


def consistency_params(
    reference: Annotated[
        SaeNames,
        Query(min_length=1, description="SAEs in which the latents must have no match (repeat)"),
    ],
    runs: Annotated[
        SaeNames,
        Query(description="other runs in each of which the latents must have a match (repeat)"),
    ] = [],  # noqa: B006 (FastAPI copies defaults)
    threshold: Annotated[
        Share, Query(description="a best decoder cosine at or above it is a match")
    ] = 0.7,
    sort: Annotated[ConsistencySort, Query(description="column to sort by")] = (
        ConsistencySort.frequency
    ),
    order: Annotated[SortOrder, Query(description="asc or desc")] = SortOrder.desc,
    after: Annotated[
        Cursor | None, EmptyIsNone, Query(description="cursor from the previous page")
    ] = None,
    limit: Annotated[PageSize | None, EmptyIsNone, Query()] = None,
) -> ConsistencyParams:
    return ConsistencyParams(runs, reference, threshold, sort, order, after, limit)


ConsistencyQuery = Annotated[ConsistencyParams, Depends(consistency_params)]
