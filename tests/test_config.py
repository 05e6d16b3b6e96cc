"""Settings: every one documented, secrets masked, placeholders refused in production."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from apix.config import PLACEHOLDER_SECRET, Environment, Settings


def env_names(model: type[BaseModel], prefix: str = "APIX_") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.extend(env_names(annotation, f"{prefix}{name.upper()}__"))
        else:
            names.append(f"{prefix}{name.upper()}")
    return names


def test_every_setting_is_documented(repo_root: Path) -> None:
    doc = (repo_root / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`(APIX_[A-Z0-9_]+)`", doc))
    expected = set(env_names(Settings))
    assert expected - documented == set(), "settings missing from docs/configuration.md"
    assert documented - expected == set(), "docs/configuration.md names unknown settings"


def test_nested_sections_read_double_underscore_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APIX_SERVER__PORT", "9123")
    monkeypatch.setenv("APIX_DATABASE__POOL_SIZE", "3")
    monkeypatch.setenv("APIX_SERVER__ALLOWED_ORIGINS", '["https://app.example.com"]')
    settings = Settings()
    assert settings.server.port == 9123
    assert settings.database.pool_size == 3
    assert settings.server.allowed_origins == ["https://app.example.com"]


@pytest.mark.parametrize("secret", [PLACEHOLDER_SECRET, "", "short"])
def test_production_refuses_placeholder_or_weak_secrets(secret: str) -> None:
    with pytest.raises(ValidationError, match="APIX_SECRET_KEY"):
        Settings(env=Environment.PRODUCTION, secret_key=secret)  # type: ignore[arg-type]


def test_production_accepts_a_real_secret_and_development_the_placeholder() -> None:
    Settings(env=Environment.PRODUCTION, secret_key="x" * 40)  # type: ignore[arg-type]
    assert Settings(env=Environment.DEVELOPMENT).secret_key.get_secret_value() == PLACEHOLDER_SECRET


def test_secrets_never_appear_in_repr() -> None:
    settings = Settings(secret_key="s3cr3t-value-that-is-long-enough-000")  # type: ignore[arg-type]
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in str(settings.model_dump())
