"""The node's CPU per Redis command: APIX's auto-pipeline against redis-py's own client.

    python -m bench.redis_batch                    # this checkout against redis-py's client
    python -m bench.redis_batch --against ecabf10  # … and revision ecabf10's auto-pipeline

Starts the embedded Redis the harness uses and sends `SET`s from 1, 8 and 32 concurrent
callers, as a connect storm or HTTP publish issues them: with one caller every batch is a
single command (the round trip's fixed cost shows), with 32 the batches fill. The figure is
this process's CPU time (user + system) per command; Redis's own time is not in it. The
baseline, in the same process and the same round, is redis-py's client
(`execute_command`: a pool checkout, a timeout and a reply read per command).

Each measurement runs in a fresh process, and the contenders take turns round by round, so
the machine's drift falls on all of them alike; the median round is reported. With
`--against REV` a git worktree of REV supplies its `apix` (this checkout's harness).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

_CALLERS = (1, 8, 32)
_COMMANDS = 12_000
_REPO = Path(__file__).resolve().parent.parent


async def _cpu_per_command(send: Callable[[], Awaitable[Any]], callers: int) -> float:
    each = _COMMANDS // callers

    async def caller() -> None:
        for _ in range(each):
            await send()

    await asyncio.gather(*(send() for _ in range(callers)))  # connected, warm
    cpu = time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return round((time.process_time() - cpu) / (each * callers) * 1e6, 1)


async def _one_round(url: str, contender: str) -> dict[str, float]:
    import uvloop  # noqa: F401  (the node's loop: installed with apix)

    from apix.config import RedisSettings
    from apix.infra.redis import AutoPipeline, create_redis

    redis = create_redis(url, RedisSettings())
    try:
        if contender == "redis-py":
            send: Callable[[], Awaitable[Any]] = lambda: redis.execute_command("SET", "b:k", "x")  # noqa: E731
        else:
            batch = AutoPipeline(redis)
            send = lambda: batch.call("SET", "b:k", "x")  # noqa: E731
        return {str(n): await _cpu_per_command(send, n) for n in _CALLERS}
    finally:
        await redis.aclose()


def _worker(url: str, contender: str) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_one_round(url, contender))))


def _run(url: str, contender: str, src: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{_REPO}"}
    argv = [sys.executable, "-m", "bench.redis_batch", "--worker", contender, "--url", url]
    out = subprocess.run(argv, env=env, cwd=_REPO, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{contender}: {out.stderr.strip()[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def measure(url: str, against: str | None, rounds: int) -> dict[str, Any]:
    contenders = {"apix": _REPO / "src", "redis-py": _REPO / "src"}
    with tempfile.TemporaryDirectory(prefix="apix-redis-batch-") as tmp:
        if against:
            tree = Path(tmp) / "against"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(tree), against],
                cwd=_REPO,
                check=True,
                capture_output=True,
            )
            contenders[against] = tree / "src"
        try:
            got: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
            for turn in range(rounds):
                order = list(contenders) if turn % 2 == 0 else list(reversed(contenders))
                for name in order:
                    contender = "redis-py" if name == "redis-py" else "apix"
                    got[name].append(_run(url, contender, contenders[name]))
        finally:
            if against:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=_REPO, check=False
                )
    return {
        "rounds": rounds,
        "commands": _COMMANDS,
        "cpu_us_per_command": {
            name: {str(n): statistics.median(r[str(n)] for r in runs) for n in _CALLERS}
            for name, runs in got.items()
        },
        "every_round": got,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_batch", description=__doc__)
    parser.add_argument("--against", metavar="REV", help="also this revision's auto-pipeline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--url", help="a Redis to use (default: start the embedded one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.url, args.worker)
        return
    from apix.infra.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="apix-redis-batch-redis-") as tmp:
        server = EmbeddedRedis(Path(tmp)) if not args.url else None
        url = args.url or (server.start() if server else "")
        try:
            result = measure(url, args.against, args.rounds)
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(result))
    for name, row in result["cpu_us_per_command"].items():
        cells = ", ".join(f"{n} caller(s) {us} µs" for n, us in row.items())
        print(f"{name}: CPU per command: {cells}")


if __name__ == "__main__":
    main()
