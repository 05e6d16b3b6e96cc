"""Adapters: one streaming chat call per provider kind, through the official SDKs.

`await adapter_for(config)` picks the adapter; `Adapter.stream(request)` yields `TextDelta`s
and ends with one `StreamEnd` carrying the provider's token counts. Every failure, from the
SDK or the network under it, comes out as a typed `ProviderCallError`. The SDKs' own retries
are off: the routing layer retries (tenacity) and fails over.

Each kind's adapter lives in its own module (`adapter_openai`, `adapter_anthropic`), imported
on the first call to a provider of that kind, in a thread so the event loop is not blocked
outright (the import holds the GIL most of the time, so the loop runs slower meanwhile):
the two SDKs are more than half of the application's import time, which every node, worker
and CLI process paid at start whether or not it ever called a provider.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

import httpx2

from apix.providers import errors
from apix.providers.types import AdapterChunk, ChatRequest, ProviderConfig

__all__ = ["NO_KEY", "Adapter", "adapter_for", "map_error"]

# Local OpenAI-compatible servers (Ollama, vLLM, llama.cpp) need no key, but the SDK needs one.
NO_KEY = "not-needed"

# kind → (module, class); every other kind speaks OpenAI's chat completions.
_ADAPTERS = {"anthropic": ("apix.providers.adapter_anthropic", "AnthropicAdapter")}
_OPENAI = ("apix.providers.adapter_openai", "OpenAIAdapter")
_SDKS = ("openai", "anthropic")


class Adapter(Protocol):
    config: ProviderConfig

    def stream(self, request: ChatRequest) -> AsyncGenerator[AdapterChunk, None]:
        """Text deltas in order, then one `StreamEnd`; raises `ProviderCallError`."""
        ...

    async def ping(self) -> None:
        """A cheap authenticated call (the model list); raises `ProviderCallError`."""
        ...


# Adapter classes whose module has finished importing. `sys.modules` would not do: it holds
# a module from the start of its import, before the class exists.
_loaded: dict[tuple[str, str], Callable[[ProviderConfig], Adapter]] = {}


async def adapter_for(config: ProviderConfig) -> Adapter:
    """The adapter for ``config``'s kind; the first of a kind imports its SDK (in a thread,
    before the caller starts timing the call). Calls made meanwhile wait for that import
    (Python's import lock), then share it."""
    where = _ADAPTERS.get(config.kind, _OPENAI)
    factory = _loaded.get(where)
    if factory is None:
        module = await asyncio.to_thread(importlib.import_module, where[0])
        factory = _loaded[where] = getattr(module, where[1])
    return factory(config)


def _sdk_errors(name: str) -> tuple[type[BaseException], ...]:
    """The SDKs' exception class ``name``, of the SDKs imported so far (an exception cannot
    come from one that is not)."""
    return tuple(getattr(sys.modules[sdk], name) for sdk in _SDKS if sdk in sys.modules)


def map_error(exc: BaseException) -> errors.ProviderCallError:
    """The typed error for an SDK or transport exception."""
    if isinstance(exc, errors.ProviderCallError):
        return exc
    if isinstance(exc, (*_sdk_errors("APITimeoutError"), httpx2.TimeoutException)):
        return errors.ProviderTimeout()
    if isinstance(exc, _sdk_errors("APIStatusError")):
        status: int = getattr(exc, "status_code", 0)
        if status < 400:
            return _from_stream_error(exc)
        return _from_status(status, _message(exc))
    if isinstance(exc, (*_sdk_errors("APIConnectionError"), httpx2.TransportError)):
        return errors.ProviderUnavailable(f"connection to the provider failed: {_message(exc)}")
    if isinstance(exc, _sdk_errors("APIError")):
        # An error the provider sent inside an open stream (no status code of its own).
        return _from_stream_error(exc)
    return errors.ProviderUnavailable(f"unexpected provider failure: {type(exc).__name__}")


def _from_status(status: int, message: str) -> errors.ProviderCallError:
    if status in (401, 403):
        return errors.ProviderAuthError(message, provider_status=status)
    if status == 429:
        return errors.ProviderRateLimited(message, provider_status=status)
    if status == 408 or status >= 500:
        return errors.ProviderUnavailable(message, provider_status=status)
    return errors.ProviderBadRequest(message, provider_status=status)


def _from_stream_error(exc: BaseException) -> errors.ProviderCallError:
    body = getattr(exc, "body", None)
    body = body if isinstance(body, dict) else {}
    error = body.get("error", body)
    kind = str(error.get("type") or "") if isinstance(error, dict) else ""
    message = _message(exc)
    if "rate_limit" in kind:
        return errors.ProviderRateLimited(message)
    if "auth" in kind or "permission" in kind:
        return errors.ProviderAuthError(message)
    if "invalid_request" in kind or "not_found" in kind:
        return errors.ProviderBadRequest(message)
    return errors.ProviderUnavailable(message)


def _message(exc: BaseException) -> str:
    """The provider's own message when its error body has one, else the SDK's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
            return str(error["message"])
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__
