"""Adapters: one streaming chat call per provider kind, through the official SDKs.

`adapter_for(config)` picks the adapter; `Adapter.stream(request)` yields `TextDelta`s and
ends with one `StreamEnd` carrying the provider's token counts. Every failure, from the SDK
or the network under it, comes out as a typed `ProviderCallError`. The SDKs' own retries
are off: the routing layer retries (tenacity) and fails over.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

import anthropic
import httpx2
import openai

from apix.providers import errors
from apix.providers.types import (
    AdapterChunk,
    ChatMessage,
    ChatRequest,
    ProviderConfig,
    StreamEnd,
    TextDelta,
    Usage,
)

__all__ = ["Adapter", "AnthropicAdapter", "OpenAIAdapter", "adapter_for", "map_error"]

# Anthropic requires `max_tokens`; used when the request names none.
ANTHROPIC_DEFAULT_MAX_TOKENS = 1024
# Local OpenAI-compatible servers (Ollama, vLLM, llama.cpp) need no key, but the SDK needs one.
_NO_KEY = "not-needed"


class Adapter(Protocol):
    config: ProviderConfig

    def stream(self, request: ChatRequest) -> AsyncGenerator[AdapterChunk, None]:
        """Text deltas in order, then one `StreamEnd`; raises `ProviderCallError`."""
        ...

    async def ping(self) -> None:
        """A cheap authenticated call (the model list); raises `ProviderCallError`."""
        ...


def adapter_for(config: ProviderConfig) -> Adapter:
    if config.kind == "anthropic":
        return AnthropicAdapter(config)
    return OpenAIAdapter(config)


def map_error(exc: BaseException) -> errors.ProviderCallError:
    """The typed error for an SDK or transport exception."""
    if isinstance(exc, errors.ProviderCallError):
        return exc
    if isinstance(
        exc, openai.APITimeoutError | anthropic.APITimeoutError | httpx2.TimeoutException
    ):
        return errors.ProviderTimeout()
    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        if exc.status_code < 400:
            return _from_stream_error(exc)
        return _from_status(exc.status_code, _message(exc))
    if isinstance(
        exc, openai.APIConnectionError | anthropic.APIConnectionError | httpx2.TransportError
    ):
        return errors.ProviderUnavailable(f"connection to the provider failed: {_message(exc)}")
    if isinstance(exc, openai.APIError | anthropic.APIError):
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


def _from_stream_error(exc: openai.APIError | anthropic.APIError) -> errors.ProviderCallError:
    body = exc.body if isinstance(exc.body, dict) else {}
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


class OpenAIAdapter:
    """OpenAI chat completions: OpenAI itself, any compatible server, and Gemini."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def _client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=self.config.api_key or _NO_KEY,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[AdapterChunk, None]:
        model = request.model or self.config.default_model
        usage = Usage()
        finish: str | None = None
        try:
            async with self._client() as client:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[_openai_message(m) for m in request.messages],
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=openai.omit if request.max_tokens is None else request.max_tokens,
                    temperature=(
                        openai.omit if request.temperature is None else request.temperature
                    ),
                )
                async with stream:
                    async for chunk in stream:
                        model = chunk.model or model
                        if chunk.usage is not None:
                            usage = Usage(
                                chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0
                            )
                        for choice in chunk.choices:
                            if choice.finish_reason:
                                finish = choice.finish_reason
                            if choice.delta.content:
                                yield TextDelta(choice.delta.content)
        except Exception as exc:
            raise map_error(exc) from exc
        yield StreamEnd(model=model, usage=usage, finish_reason=finish)

    async def ping(self) -> None:
        try:
            async with self._client() as client:
                await client.models.list()
        except Exception as exc:
            raise map_error(exc) from exc


def _openai_message(message: ChatMessage) -> openai.types.chat.ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}


class AnthropicAdapter:
    """Anthropic's Messages API (streaming server-sent events)."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def _client(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=self.config.api_key or _NO_KEY,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[AdapterChunk, None]:
        model = request.model or self.config.default_model
        # Anthropic takes the system prompt apart from the conversation.
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        messages = [_anthropic_message(m) for m in request.messages if m.role != "system"]
        input_tokens = output_tokens = 0
        finish: str | None = None
        try:
            async with self._client() as client:
                stream = await client.messages.create(
                    model=model,
                    messages=messages,
                    max_tokens=request.max_tokens or ANTHROPIC_DEFAULT_MAX_TOKENS,
                    stream=True,
                    system=system or anthropic.omit,
                    # The SDK no longer types `temperature`; models that take it still do.
                    extra_body=(
                        None
                        if request.temperature is None
                        else {"temperature": request.temperature}
                    ),
                )
                async with stream:
                    async for event in stream:
                        if event.type == "message_start":
                            model = event.message.model or model
                            input_tokens = event.message.usage.input_tokens or 0
                            output_tokens = event.message.usage.output_tokens or 0
                        elif event.type == "content_block_delta":
                            if event.delta.type == "text_delta" and event.delta.text:
                                yield TextDelta(event.delta.text)
                        elif event.type == "message_delta":
                            # Counts in message_delta are cumulative for the message.
                            output_tokens = event.usage.output_tokens or output_tokens
                            if event.usage.input_tokens:
                                input_tokens = event.usage.input_tokens
                            finish = event.delta.stop_reason or finish
        except Exception as exc:
            raise map_error(exc) from exc
        yield StreamEnd(model=model, usage=Usage(input_tokens, output_tokens), finish_reason=finish)

    async def ping(self) -> None:
        try:
            async with self._client() as client:
                await client.models.list(limit=1)
        except Exception as exc:
            raise map_error(exc) from exc


def _anthropic_message(message: ChatMessage) -> anthropic.types.MessageParam:
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}
