"""What the adapters and the routing layer exchange: requests, stream chunks, provider configs.

Plain frozen dataclasses, free of SDK types, so agents and runs depend on these alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

ProviderKind = Literal["openai", "anthropic", "gemini"]
Capability = Literal["chat", "tools", "embeddings", "vision"]
Role = Literal["system", "user", "assistant"]

PROVIDER_KINDS: tuple[ProviderKind, ...] = ("openai", "anthropic", "gemini")
CAPABILITIES: tuple[Capability, ...] = ("chat", "tools", "embeddings", "vision")

# Where a provider without its own base URL is reached. Gemini is called through its
# OpenAI-compatible endpoint, with the `openai` SDK.
DEFAULT_BASE_URLS: dict[ProviderKind, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai/",
}


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A provider ready to call: its decrypted key is kept out of `repr`."""

    id: uuid.UUID
    org_id: uuid.UUID
    name: str
    kind: ProviderKind
    base_url: str
    default_model: str
    capabilities: tuple[str, ...]
    timeout_s: float
    fallback_ids: tuple[uuid.UUID, ...] = ()
    is_primary: bool = False
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat completion; ``model`` None means the provider's default model."""

    messages: tuple[ChatMessage, ...]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer, in order."""

    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last chunk of an adapter's stream: the provider's own token counts."""

    model: str
    usage: Usage
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Reset:
    """The provider failed after answering in part; the next one starts the answer over."""

    provider_id: uuid.UUID
    reason: str


@dataclass(frozen=True, slots=True)
class Completed:
    """The last chunk of a routed call: who answered, usage and cost (already metered)."""

    provider_id: uuid.UUID
    provider_name: str
    model: str
    usage: Usage
    cost_usd: Decimal
    latency_ms: float  # whole call, on the provider that answered
    first_token_ms: float | None
    finish_reason: str | None = None


AdapterChunk = TextDelta | StreamEnd
Chunk = TextDelta | Reset | Completed


def kind_of(value: str) -> ProviderKind:
    """A stored kind as the `ProviderKind` it is."""
    for kind in PROVIDER_KINDS:
        if kind == value:
            return kind
    raise ValueError(f"unknown provider kind {value!r}")
