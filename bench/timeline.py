"""When in a run were the late events? Reads what the generator wrote with BENCH_TIMELINE.

    BENCH_TIMELINE=/tmp/tl python -m bench run --targets apix --scenarios fanout ...
    python -m bench.timeline /tmp/tl            # every run found there
    python -m bench.timeline /tmp/tl --late-ms 40 --run 10002

For each event, its earliest arrival at any subscriber says whether the server sent it late
as a whole (a stall, a backlog), and its latest arrival how long its fan-out took to reach
everyone. Runs of late events are printed with the time they were due, counted from the
run's first event: stalls that come back at a fixed period point at a timer.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

Event = list[int]  # [earliest µs, latest µs, deliveries, intended send time µs]


def load(directory: Path) -> dict[int, dict[int, Event]]:
    """Every run's events, merged over the generator processes that received them."""
    runs: dict[int, dict[int, Event]] = {}
    for path in sorted(directory.glob("run-*-*.json")):
        found = re.fullmatch(r"run-(\d+)-\d+\.json", path.name)
        if found is None:
            continue
        events = runs.setdefault(int(found.group(1)), {})
        for seq, (low, high, n, sent) in json.loads(path.read_text()):
            event = events.get(seq)
            if event is None:
                events[seq] = [low, high, n, sent]
            else:
                event[0], event[1], event[2] = min(event[0], low), max(event[1], high), event[2] + n
    return runs


def _pct(values: list[int], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * p))] / 1000


def describe(events: dict[int, Event], late_ms: float) -> list[str]:
    seqs = sorted(events)
    lows, highs = [events[s][0] for s in seqs], [events[s][1] for s in seqs]
    lines = [
        f"{len(seqs)} events; latest arrival p50 {_pct(highs, 0.5):.1f} p90 "
        f"{_pct(highs, 0.9):.1f} p99 {_pct(highs, 0.99):.1f} ms; earliest arrival p50 "
        f"{_pct(lows, 0.5):.1f} p90 {_pct(lows, 0.9):.1f} p99 {_pct(lows, 0.99):.1f} ms"
    ]
    start = events[seqs[0]][3]
    stall: list[int] = []
    for seq in [*seqs, None]:
        late = seq is not None and events[seq][1] > late_ms * 1000
        if late and (not stall or seq - stall[-1] <= 2):  # a gap of one or two: the same
            stall.append(seq)
            continue
        if stall:
            first = events[stall[0]]
            lines.append(
                f"  due at {(first[3] - start) / 1e6:6.2f} s: {len(stall)} late events "
                f"(#{stall[0]}-{stall[-1]}), earliest arrival up to "
                f"{max(events[s][0] for s in stall) / 1000:.0f} ms, latest up to "
                f"{max(events[s][1] for s in stall) / 1000:.0f} ms"
            )
        stall = [seq] if late and seq is not None else []
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--run", type=int, help="one run id (default: all)")
    parser.add_argument("--late-ms", type=float, default=25.0, help="late: arrived after this")
    args = parser.parse_args()
    runs = load(args.directory)
    for run, events in sorted(runs.items()):
        if events and (args.run is None or run == args.run):
            print(f"run {run}: " + "\n".join(describe(events, args.late_ms)))


if __name__ == "__main__":
    main()
