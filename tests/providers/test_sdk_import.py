"""The provider SDKs are imported by the first call to a provider of their kind, not at start:
together they were more than half of every node's, worker's and CLI command's import time."""

from __future__ import annotations

import subprocess
import sys


def _imported_after(statement: str) -> list[str]:
    sdks = "print(' '.join(m for m in ('openai', 'anthropic') if m in sys.modules))"
    code = f"import sys; {statement}; {sdks}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout.split()


def test_starting_the_application_or_the_cli_imports_no_provider_sdk() -> None:
    assert _imported_after("import apix.app, apix.cli, apix.worker") == []


def test_the_first_adapter_of_a_kind_imports_its_own_sdk_only() -> None:
    statement = (
        "import asyncio, uuid; from apix.providers.adapters import adapter_for; "
        "from apix.providers.types import ProviderConfig; "
        "config = ProviderConfig(uuid.uuid4(), uuid.uuid4(), 'p', '{}', 'http://127.0.0.1:9', "
        "'m', (), 5.0); "
        "print(type(asyncio.run(adapter_for(config))).__name__, end=' ')"
    )
    assert _imported_after(statement.format("anthropic")) == ["AnthropicAdapter", "anthropic"]
    assert _imported_after(statement.format("openai")) == ["OpenAIAdapter", "openai"]
    assert _imported_after(statement.format("gemini")) == ["OpenAIAdapter", "openai"]
