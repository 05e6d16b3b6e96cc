"""The Python side of the Node load generator (bench/node/loadgen.js).

Subscriber processes each hold a slice of the connections (well under the open-files
limit), spread over several 127.0.0.x source addresses so no (source, destination) pair
runs out of ephemeral ports. Publishers are separate processes started per measurement.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.procs import HarnessError, Proc

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "loadgen.js"
# Connections per generator process: far below the 20,000 open-files limit.
PER_PROCESS = 8_000
SOURCES = [f"127.0.0.{i}" for i in range(2, 18)]


def ensure_node_modules() -> None:
    """`npm ci` on first use (bench/node/package-lock.json pins `ws`)."""
    if (NODE_DIR / "node_modules" / "ws").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise HarnessError("npm not found: install Node.js 18+ for the load generator")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)


def node_version() -> str:
    return subprocess.run(
        ["node", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def ws_version() -> str:
    path = NODE_DIR / "node_modules" / "ws" / "package.json"
    return str(json.loads(path.read_text())["version"]) if path.exists() else "?"


def client() -> str:
    """The generator's WebSocket client (loadgen.js reads the same variable)."""
    if os.environ.get("BENCH_CLIENT") == "ws":
        return f"ws {ws_version()}"
    return "bench/node/rawws.js"


def _spawn(name: str, config: dict[str, Any], log: Path) -> Proc:
    argv = ["node", "--max-old-space-size=2048", str(SCRIPT), json.dumps(config)]
    proc = Proc(name, argv, log=log, env=dict(os.environ), pipe=True)
    proc.expect("started", 20)
    return proc


class Histogram:
    """Merges the generators' log-linear counts into an HDR histogram (µs, 3 digits)."""

    def __init__(self) -> None:
        self.hdr = HdrHistogram(1, 600_000_000, 3)
        self.max = 0

    def add(self, data: dict[str, Any]) -> None:
        for value, count in data.get("counts", {}).items():
            self.hdr.record_value(max(1, int(value)), int(count))
        self.max = max(self.max, int(data.get("max", 0)))

    def summary(self) -> dict[str, float | int | None]:
        n = self.hdr.get_total_count()
        if n == 0:
            return {"n": 0, "p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
        pct = self.hdr.get_value_at_percentile
        return {
            "n": n,
            "p50_ms": round(pct(50) / 1000, 3),
            "p90_ms": round(pct(90) / 1000, 3),
            "p99_ms": round(pct(99) / 1000, 3),
            "p999_ms": round(pct(99.9) / 1000, 3),
            "max_ms": round(self.max / 1000, 3),
        }


class Subscribers:
    """N connections over `processes` generator processes, each subscribed to one channel."""

    def __init__(
        self,
        workdir: Path,
        *,
        urls: list[str],
        dialect: str,
        token: str,
        connections: int,
        channel_prefix: str,
        channel_count: int,
        processes: int | None = None,
        lifetime_s: float = 1800,
    ) -> None:
        self.connections = connections
        count = processes or max(1, math.ceil(connections / PER_PROCESS))
        self.procs: list[Proc] = []
        share, extra = divmod(connections, count)
        first = 0
        for i in range(count):
            n = share + (1 if i < extra else 0)
            config = {
                "mode": "sub",
                "url": urls,
                "dialect": dialect,
                "token": token,
                "connections": n,
                "first_index": first,
                "channel_prefix": channel_prefix,
                "channel_count": channel_count,
                # Each process its own source addresses, so their ports never collide.
                "sources": SOURCES[i::count] or SOURCES,
                "concurrency": 64,
                "max_lifetime_s": lifetime_s,
            }
            self.procs.append(_spawn(f"gen-sub-{i}", config, workdir / f"gen-sub-{i}.log"))
            first += n
        self.subscribed: Counter[str] = Counter()
        self.opened: dict[str, Any] = {}

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def open(self, timeout: float = 300) -> dict[str, Any]:
        started = time.monotonic()
        for proc in self.procs:
            proc.send({"cmd": "open"})
        results = [proc.expect("opened", timeout) for proc in self.procs]
        wall = time.monotonic() - started
        errors: Counter[str] = Counter()
        for r in results:
            self.subscribed.update(r["by_channel"])
            errors.update(r["errors"])
        ok = sum(r["ok"] for r in results)
        self.opened = {
            "ok": ok,
            "failed": sum(r["failed"] for r in results),
            "seconds": round(wall, 3),
            "connects_per_s": round(ok / wall, 1) if wall > 0 else None,
            "generator_cpu_s": round(sum(r["cpu_us"] for r in results) / 1e6, 3),
            "errors": dict(errors.most_common(5)),
        }
        return self.opened

    def reset(self, run: int) -> int:
        for proc in self.procs:
            proc.send({"cmd": "reset", "run": run})
        return sum(proc.expect("reset", 30)["open"] for proc in self.procs)

    def count(self) -> int:
        for proc in self.procs:
            proc.send({"cmd": "count"})
        return sum(proc.expect("count", 30)["received"] for proc in self.procs)

    def drain(self, expected: int, max_s: float) -> None:
        """Wait until every expected delivery arrived, or the count stops moving."""
        deadline = time.monotonic() + max_s
        last, still = -1, 0
        while time.monotonic() < deadline:
            now = self.count()
            if now >= expected:
                return
            still = still + 1 if now == last else 0
            if still >= 3:
                return
            last = now
            time.sleep(0.3)

    def report(self) -> dict[str, Any]:
        for proc in self.procs:
            proc.send({"cmd": "report"})
        reports = [proc.expect("report", 60) for proc in self.procs]
        hist = Histogram()
        errors: Counter[str] = Counter()
        for r in reports:
            hist.add(r["hist"])
            errors.update(r["errors"])
        received = sum(r["received"] for r in reports)
        return {
            "received": received,
            "bytes": sum(r["bytes"] for r in reports),
            "stray": sum(r["stray"] for r in reports),
            "closed_early": sum(r["closed_early"] for r in reports),
            "open": sum(r["open"] for r in reports),
            "cpu_s": sum(r["cpu_us"] for r in reports) / 1e6,
            "last_us": max(r["last_us"] for r in reports),
            "latency": hist.summary(),
            "errors": dict(errors.most_common(5)),
        }

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                with contextlib.suppress(OSError):
                    proc.send({"cmd": "quit"})
        for proc in self.procs:
            proc.stop(timeout=10)


def publisher(workdir: Path, name: str, config: dict[str, Any]) -> Proc:
    return _spawn(name, {"max_lifetime_s": 900, **config}, workdir / f"{name}.log")


def merged(data: dict[str, Any]) -> dict[str, Any]:
    hist = Histogram()
    hist.add(data)
    return hist.summary()
