"""Server settings: from arguments of `saescope serve`, or SAESCOPE_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from saescope.db.queries.paging import MAX_PAGE_SIZE


class Settings(BaseSettings):
    """Every setting of the server; the README's configuration table lists the same."""

    model_config = SettingsConfigDict(env_prefix="SAESCOPE_")

    database: Path = Field(description="database file written by `saescope build`")
    page_size: int = Field(
        50, ge=1, le=MAX_PAGE_SIZE, description="features per page of the feature table"
    )
    search_limit: int = Field(10, ge=1, le=50, description="matching tokens shown per search")
    labels: Path | None = Field(
        None,
        description="writable file of the latents' labels and notes (default: beside the "
        "database, NAME.labels.sqlite)",
    )
    explanations: Path | None = Field(
        None,
        description="file of the latents' explanations and scores written by `saescope explain` "
        "(default: beside the database, NAME.explanations.sqlite)",
    )
    write_token: str | None = Field(
        None, description="token that writing labels needs (none: labels are read-only)"
    )
    inference_url: str | None = Field(
        None,
        description="URL of the inference process (`saescope infer`), which runs the model on "
        "text typed into the dashboard",
    )

    inference_token: str | None = Field(
        None,
        description="token the inference process was started with (its "
        "SAESCOPE_INFERENCE_TOKEN), sent to it as a Bearer token",
    )

    allowed_hosts: str | None = Field(
        None,
        description="comma-separated host names the server answers to (the Host header), * for "
        "any; `serve` defaults to the address it listens on, localhost and 127.0.0.1, so that "
        "no other site's page can reach it through DNS rebinding",
    )

    def hosts(self) -> frozenset[str] | None:
        """The Host names answered (lower case, no port); None: any."""
        if self.allowed_hosts is None or self.allowed_hosts.strip() == "*":
            return None
        return frozenset(
            name.strip().strip("[]").lower()
            for name in self.allowed_hosts.split(",")
            if name.strip()
        )

    @field_validator("write_token", "inference_token")
    @classmethod
    def token_not_blank(cls, token: str | None) -> str | None:
        if token is not None and not token.strip():
            raise ValueError("is empty: set a token, or leave it unset")
        return token
