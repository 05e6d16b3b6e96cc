"""The node's hot-path recorder: cheap calls from the gateway, drained in batches.

The gateway calls `DeliveryProbe.written` for every live event frame it writes to a socket.
The frame (one string object per event per node, shared by every subscriber) is parsed once
per event; a delivery then costs an identity check, a counter and a bit test. Latency is
sampled on the first delivery of each event per client type, plus every N-th delivery, so
subscribers late in a large fan-out are measured too. A sample is counted at once in its
series' `Tally` (by histogram bucket), and tallies and counts wait in memory until the
monitoring runtime drains them into histograms (no Redis, no database here).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from apix.monitoring.histograms import Tally

PLATFORM = "*"  # the organisation key of platform-wide figures

CLIENT_TYPES = ("WEB_APP", "MOBILE_APP", "SDK_WIDGET", "API_CLIENT", "INTERNAL_SERVICE")
_BITS = {name: 1 << i for i, name in enumerate(CLIENT_TYPES)}

# `{"op":"event","channel":"` opens every event frame (apix.realtime.broker.event_frame).
_CHANNEL_AT = len('{"op":"event","channel":"')


@dataclass(slots=True)
class Label:
    """Who a connection's frames go to: set once the connection is established."""

    org: str
    client_type: str
    bit: int = 0

    def __post_init__(self) -> None:
        self.bit = _BITS.get(self.client_type, 1 << len(CLIENT_TYPES))


# A latency series: (organisation, metric, dimension 1, dimension 2).
HKey = tuple[str, str, str, str]
Tallies = dict[HKey, Tally]
# (organisation, counter, dimension) → count
Counts = dict[tuple[str, str, str], int]


def frame_channel(frame: str) -> str:
    """The channel of an event frame, read from its fixed prefix (no JSON parse)."""
    return frame[_CHANNEL_AT : frame.index('"', _CHANNEL_AT)]


def frame_ts(frame: str) -> int | None:
    """The event's `ts` (publish time, epoch ms): the first `,"ts":` of the frame is the
    payload's (channel, offset, epoch, id and type never hold that text)."""
    at = frame.find(',"ts":')
    if at < 0:
        return None
    end = frame.find(",", at + 6)
    try:
        return int(frame[at + 6 : end])
    except ValueError:
        return None


@dataclass(slots=True)
class DeliveryProbe:
    sample_every: int = 16
    tallies: Tallies = field(default_factory=dict)
    counts: Counts = field(default_factory=lambda: defaultdict(int))
    # The event being fanned out: its frame, publish time, namespace, channel, and
    # which client types have had their sample.
    _frame: str | None = None
    _ts: int | None = None
    _namespace: str = ""
    _channel: str = ""
    _org: str = ""
    _n: int = 0
    _seen: int = 0
    _countdown: int = 1

    def written(self, frame: str, label: Label) -> None:
        """A live event frame went to a socket (called once per delivery)."""
        if frame is not self._frame:
            self._switch(frame, label)
        self._n += 1
        bit = label.bit
        if self._seen & bit:
            self._countdown -= 1
            if self._countdown > 0:
                return
        else:
            self._seen |= bit
        self._countdown = self.sample_every
        ts = self._ts
        if ts is not None:
            micros = int(time.time() * 1_000_000) - ts * 1000
            self._sample((label.org, "delivery", self._namespace, label.client_type), micros)

    def redelivered(self, frame: str, label: Label) -> None:
        channel = frame_channel(frame)
        self.counts[(label.org, "redelivered", channel.partition(":")[0])] += 1

    def coalesced(self, label: Label, namespace: str) -> None:
        self.counts[(label.org, "coalesced", namespace)] += 1

    def dead_lettered(self, org: str, channel: str) -> None:
        self.counts[(org, "dead_lettered", channel.partition(":")[0])] += 1

    def rtt(self, label: Label, seconds: float) -> None:
        self._sample((label.org, "rtt", "", label.client_type), int(seconds * 1_000_000))

    def http(self, route: str, method: str, seconds: float) -> None:
        self._sample((PLATFORM, "http", route, method), int(seconds * 1_000_000))

    def round_trip(self, metric: str, seconds: float) -> None:
        self._sample((PLATFORM, metric, "", ""), int(seconds * 1_000_000))

    def published(self, org: str, channel: str, n: int = 1) -> None:
        self.counts[(org, "published", channel.partition(":")[0])] += n
        self.counts[(org, "channel_in", channel)] += n

    def take(self) -> tuple[Tallies, Counts]:
        """Hand over what was recorded since the last call."""
        self._flush()
        tallies, self.tallies = self.tallies, {}
        counts, self.counts = self.counts, defaultdict(int)
        return tallies, counts

    def _switch(self, frame: str, label: Label) -> None:
        self._flush()
        self._frame = frame
        self._ts = frame_ts(frame)
        self._channel = frame_channel(frame)
        self._namespace = self._channel.partition(":")[0]
        self._org = label.org
        self._seen = 0

    def _flush(self) -> None:
        if self._n:
            self.counts[(self._org, "delivered", self._namespace)] += self._n
            self.counts[(self._org, "channel_out", self._channel)] += self._n
            self._n = 0

    def _sample(self, key: HKey, micros: int) -> None:
        tally = self.tallies.get(key)
        if tally is None:
            tally = self.tallies[key] = Tally()
        tally.add(micros)
