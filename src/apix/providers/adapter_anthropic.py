"""The Anthropic adapter: the Messages API, streamed as server-sent events.

Imported on the first call to a provider of its kind (`apix.providers.adapters`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anthropic

from apix.providers.adapters import NO_KEY, map_error
from apix.providers.types import (
    AdapterChunk,
    ChatMessage,
    ChatRequest,
    ProviderConfig,
    StreamEnd,
    TextDelta,
    Usage,
)

__all__ = ["ANTHROPIC_DEFAULT_MAX_TOKENS", "AnthropicAdapter"]

# Anthropic requires `max_tokens`; used when the request names none.
ANTHROPIC_DEFAULT_MAX_TOKENS = 1024


class AnthropicAdapter:
    """Anthropic's Messages API (streaming server-sent events)."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def _client(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=self.config.api_key or NO_KEY,
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
