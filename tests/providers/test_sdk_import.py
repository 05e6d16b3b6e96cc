"""The provider SDKs are imported by the first call to a provider of their kind, not at start:
together they were more than half of every node's, worker's and CLI command's import time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Run in a fresh interpreter: prints the adapter classes made, then the SDKs imported.
_SCRIPT = """
import asyncio, sys, uuid
from apix.providers.adapters import adapter_for
from apix.providers.types import ProviderConfig

async def one(kind, delay):
    # Calls keep arriving while the first one's import runs, as a health-check round
    # makes them: a module is in `sys.modules` before it is whole.
    await asyncio.sleep(delay)
    url = "http://127.0.0.1:9"
    config = ProviderConfig(uuid.uuid4(), uuid.uuid4(), "p", kind, url, "m", (), 5.0)
    return type(await adapter_for(config)).__name__

async def main(kind):
    return await asyncio.gather(*(one(kind, i * 0.01) for i in range(40)))

made = asyncio.run(main(sys.argv[1])) if len(sys.argv) > 1 else []
print(*sorted(set(made)), *(m for m in ("openai", "anthropic") if m in sys.modules))
"""


def _run(tmp_path: Path, *args: str, prelude: str = "") -> list[str]:
    script = tmp_path / "sdks.py"
    script.write_text(prelude + _SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return result.stdout.split()


def test_starting_the_application_or_the_cli_imports_no_provider_sdk(tmp_path: Path) -> None:
    assert _run(tmp_path, prelude="import apix.app, apix.cli, apix.worker\n") == []


def test_the_first_adapter_of_a_kind_imports_its_own_sdk_only(tmp_path: Path) -> None:
    assert _run(tmp_path, "anthropic") == ["AnthropicAdapter", "anthropic"]
    assert _run(tmp_path, "gemini") == ["OpenAIAdapter", "openai"]
