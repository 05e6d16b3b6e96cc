"""The channel registry: grammar, namespaces, who may subscribe and publish, retention.

This is PROTOCOL.md section 4 in one place. A channel name always means a channel of the
caller's own organisation: `ChannelRef.stream_key` prefixes the tenant from the token, so no
name can reach another tenant's channel (the `system` channel is the one platform-wide
stream, which every tenant reads and only operators write).
"""

from __future__ import annotations

import enum
import hashlib
import re
import uuid
import zlib
from dataclasses import dataclass

from apix.core.errors import BadRequest, Forbidden, NotFound
from apix.identity.permissions import Role
from apix.identity.principal import Principal, PrincipalKind

_NAMESPACE = re.compile(r"^[a-z][a-z0-9_-]*$")
_KEY = re.compile(r"^[A-Za-z0-9_.@=-]{1,128}$")
MAX_NAME = 200
PLATFORM = "platform"  # the tenant part of platform-wide channels


class Who(enum.Enum):
    NOBODY = "nobody"
    MEMBER = "member"  # any member (VIEWER+)
    DEVELOPER = "developer"  # DEVELOPER+
    ORG_ADMIN = "org_admin"  # ORG_ADMIN+
    SESSION = "session"  # the session's owner, DEVELOPER+, or a widget bound to it
    SELF = "self"  # user:<id>: that user only
    OPERATOR = "operator"  # SUPER_ADMIN (over HTTP)


class Priority(enum.IntEnum):
    """Quality-of-service class: under send-buffer pressure, lower classes yield first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    subscribe: Who
    publish: Who  # from a client (WebSocket)
    http_publish: Who  # through the HTTP publish API (services)
    max_len: int
    max_age_s: int
    keyed: bool | None  # True: needs `:key`; False: no key; None: either
    priority: Priority = Priority.NORMAL
    platform_wide: bool = False
    archived: bool = True  # False: the Redis stream (max_len, max_age_s) is all it keeps


_DAY = 24 * 3600
NAMESPACES: dict[str, Namespace] = {
    ns.name: ns
    for ns in [
        *(
            Namespace(n, Who.MEMBER, Who.NOBODY, Who.DEVELOPER, 1000, _DAY, None)
            for n in ("agents", "tools", "workflows", "providers", "knowledge")
        ),
        Namespace("sessions", Who.SESSION, Who.SESSION, Who.DEVELOPER, 1000, _DAY, True),
        Namespace(
            "user", Who.SELF, Who.NOBODY, Who.DEVELOPER, 10_000, 7 * _DAY, True, Priority.HIGH
        ),
        Namespace("org", Who.MEMBER, Who.ORG_ADMIN, Who.DEVELOPER, 1000, _DAY, False),
        Namespace("room", Who.MEMBER, Who.MEMBER, Who.DEVELOPER, 1000, _DAY, True, Priority.LOW),
        Namespace(
            "hitl", Who.DEVELOPER, Who.NOBODY, Who.DEVELOPER, 1000, _DAY, None, Priority.HIGH
        ),
        Namespace(
            "system", Who.MEMBER, Who.NOBODY, Who.OPERATOR, 100, _DAY, False, platform_wide=True
        ),
        # Live telemetry (connections, subscriptions, alerts, dead letters), kept one hour:
        # what lasts of it is elsewhere (connection records, alert and dead-letter tables),
        # and archiving it paid a row for every connect and subscribe of a storm.
        Namespace(
            "monitor", Who.ORG_ADMIN, Who.NOBODY, Who.NOBODY, 1000, 3600, False, archived=False
        ),
    ]
}


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """A channel of one organisation (or of the platform, for `system`)."""

    name: str  # canonical name, as clients see it
    namespace: Namespace
    key: str | None
    tenant: str  # organisation id, or PLATFORM

    @property
    def archived(self) -> bool:
        """Whether the archive keeps this channel's events (tenant channels whose namespace
        is archived: all but `monitor`)."""
        return self.tenant != PLATFORM and self.namespace.archived

    @property
    def partition(self) -> int:
        return partition_of(self.tenant, self.name)

    @property
    def prefix(self) -> str:
        return channel_prefix(self.tenant, self.name)

    @property
    def stream_key(self) -> str:
        return f"{self.prefix}:s"

    @property
    def meta_key(self) -> str:
        return f"{self.prefix}:m"

    @property
    def presence_key(self) -> str:
        return f"{self.prefix}:p"

    @property
    def archive_key(self) -> str:
        return archive_key(self.partition)

    @property
    def counter_key(self) -> str:
        return counter_key(self.partition)

    def idempotency_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    @property
    def pubsub_channel(self) -> str:
        return f"{self.prefix}:live"


# Channels are spread over this many partitions. A partition is one Redis Cluster hash tag:
# a channel's stream, metadata, presence and idempotency keys share it with the partition's
# archive stream, so the publish script touches a single slot.
PARTITIONS = 64


def partition_of(tenant: str, name: str) -> int:
    return zlib.crc32(f"{tenant}:{name}".encode()) % PARTITIONS


def channel_prefix(tenant: str, name: str) -> str:
    return f"apix:ch:{{p{partition_of(tenant, name)}}}:{tenant}:{name}"


def archive_key(partition: int) -> str:
    """The partition's queue of events for the archiver (a stream read by a consumer group)."""
    return f"apix:archive:{{p{partition}}}"


def counter_key(partition: int) -> str:
    """The partition's count of published events per channel, for monitoring (a hash)."""
    return f"apix:mon:published:{{p{partition}}}"


def parse(name: object, principal: Principal) -> ChannelRef:
    """Validate a channel name and bind it to the caller's tenant.

    Raises `BadRequest` for a name that breaks the grammar and `NotFound` for an unknown
    namespace. `user:me` resolves to the caller's own `user:<id>`.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise BadRequest("channel must be a string of 1 to 200 characters")
    namespace_name, sep, key = name.partition(":")
    if not _NAMESPACE.match(namespace_name) or (sep and not _KEY.match(key)):
        raise BadRequest(f"invalid channel name {name!r}")
    namespace = NAMESPACES.get(namespace_name)
    if namespace is None:
        raise NotFound(f"unknown channel namespace {namespace_name!r}")
    if namespace.keyed is True and not sep:
        raise BadRequest(
            f"channel namespace {namespace_name!r} needs a key: {namespace_name}:<key>"
        )
    if namespace.keyed is False and sep:
        raise BadRequest(f"channel namespace {namespace_name!r} takes no key")
    if namespace.name == "user" and key == "me":
        if principal.user_id is None:
            raise Forbidden("user:me needs a user's token")
        key = str(principal.user_id)
    canonical = f"{namespace_name}:{key}" if sep else namespace_name
    if namespace.platform_wide:
        tenant = PLATFORM
    elif principal.org_id is None:
        raise Forbidden("real-time channels need an organization; switch to one first")
    else:
        tenant = str(principal.org_id)
    return ChannelRef(canonical, namespace, key if sep else None, tenant)


def check_subscribe(principal: Principal, channel: ChannelRef) -> None:
    _check(principal, channel, channel.namespace.subscribe, "subscribe to")


def check_publish(principal: Principal, channel: ChannelRef, *, http: bool = False) -> None:
    rule = channel.namespace.http_publish if http else channel.namespace.publish
    if http and not principal.can("apix:publish") and rule is not Who.OPERATOR:
        raise Forbidden("missing permission apix:publish")
    _check(principal, channel, rule, "publish to")


def _check(principal: Principal, channel: ChannelRef, rule: Who, verb: str) -> None:
    if not _allowed(principal, channel, rule):
        raise Forbidden(f"not allowed to {verb} {channel.name}")


def _allowed(principal: Principal, channel: ChannelRef, rule: Who) -> bool:
    role = principal.role
    match rule:
        case Who.NOBODY:
            return False
        case Who.MEMBER:
            return role.at_least(Role.VIEWER)
        case Who.DEVELOPER:
            return role.at_least(Role.DEVELOPER)
        case Who.ORG_ADMIN:
            return role.at_least(Role.ORG_ADMIN)
        case Who.OPERATOR:
            return principal.is_super_admin
        case Who.SELF:
            return principal.user_id is not None and str(principal.user_id) == channel.key
        case Who.SESSION:
            # The session's owner and widget tokens bound to it are admitted once sessions
            # and widgets exist; until then, developers and above.
            return principal.kind is not PrincipalKind.WIDGET and role.at_least(Role.DEVELOPER)


def org_uuid(channel: ChannelRef) -> uuid.UUID | None:
    return None if channel.tenant == PLATFORM else uuid.UUID(channel.tenant)
