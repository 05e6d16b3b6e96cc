"""The scenarios of issue 5, each run against every target that supports it.

Every figure that depends on CPU is measured with psutil on the process trees (server,
APIX's Redis + PostgreSQL as "aux", load generators) over the same window, so a reader can
tell when the generator, not the server, was the limit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.procs import CpuWindow, HarnessError, Proc, rss_bytes
from bench.targets import Apix, Target, server_processes

PAD = 32  # bytes of padding in each event's data (~128-byte events on the baselines)
# Before a series' first measured rate, the publisher runs at that rate unmeasured for this
# long (at least WARMUP_EVENTS events, at most WARMUP_MAX_S): the first events a fresh
# server and generator see are slow on both sides (cold code paths, first writes to every
# socket), and would otherwise decide the first rate's tail.
WARMUP_S = 2.0
WARMUP_EVENTS = 10
WARMUP_MAX_S = 10.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Context:
    workdir: Path
    profile: dict[str, Any]
    targets: dict[str, Target]
    results: dict[str, Any]
    docs_dir: Path
    keep_dir: Path | None = None  # where raw profiles are kept (bench/results/…)
    run_counter: int = 0
    save: Callable[[], None] = field(default=lambda: None)

    def next_run(self) -> int:
        self.run_counter += 1
        return self.run_counter


# --- one measurement: a publisher at a fixed rate against subscribers already open -------


def measure_publish(
    ctx: Context,
    target: Target,
    subs: loadgen.Subscribers,
    *,
    rate: float,
    duration_s: float,
    channel_prefix: str,
    channel_count: int,
    publisher_connections: int = 1,
    during: Callable[[Proc], None] | None = None,
) -> dict[str, Any]:
    run = ctx.next_run()
    pub = loadgen.publisher(
        ctx.workdir,
        f"gen-pub-{run}",
        {
            "mode": "pub",
            "url": target.ws_urls()[:1],
            "dialect": target.dialect,
            "token": target.token,
            "connections": publisher_connections,
            "channel_prefix": channel_prefix,
            "channel_count": channel_count,
            "rate": rate,
            "duration_s": duration_s,
            "run": run,
            "pad": PAD,
            "sources": ["127.0.0.1"],
        },
    )
    try:
        open_now = subs.reset(run)
        server = CpuWindow(target.server_pids()).start()
        aux = CpuWindow(target.aux_pids()).start()
        gens = CpuWindow([*subs.pids(), pub.pid]).start()
        pub.send({"cmd": "go"})
        if during is not None:
            during(pub)
        published = pub.expect("published", duration_s + 60)
        ok_by_channel: dict[str, int] = published["ok_by_channel"]
        expected = sum(n * subs.subscribed.get(ch, 0) for ch, n in ok_by_channel.items())
        subs.drain(expected, max_s=max(10.0, duration_s))
        server.stop()
        aux.stop()
        gens.stop()
        report = subs.report()
    finally:
        pub.stop(timeout=5)
    delivered = report["received"]
    # From the first intended send to the last delivery: a backlog stretches the window.
    seconds = max(published["publish_us"], report["last_us"] - published["t0_us"]) / 1e6
    offered = rate * subs.connections / max(1, channel_count)
    row: dict[str, Any] = {
        "target": target.key,
        "rate": rate,
        "duration_s": duration_s,
        "delivery_window_s": round(seconds, 3),
        "subscribers_open": open_now,
        "published_ok": published["ok"],
        "publish_errors": published["errors"],
        "publisher_lag_max_ms": round(published["lag_max_us"] / 1000, 3),
        "publish_ack": loadgen.merged(published["ack"]),
        "expected": expected,
        "delivered": delivered,
        "lost": max(0, expected - delivered),
        "stray": report["stray"],
        "closed_early": report["closed_early"],
        "offered_deliveries_per_s": round(offered, 1),
        "deliveries_per_s": round(delivered / seconds, 1) if seconds else None,
        "latency": report["latency"],
        "frame_bytes": round(report["bytes"] / delivered, 1) if delivered else None,
        "server_cpu_s": round(server.cpu, 3),
        "aux_cpu_s": round(aux.cpu, 3),
        "window_s": round(server.wall, 3),
        "server_cores": round(server.cpu / server.wall, 3),
        "generator_cores": round(gens.cpu / gens.wall, 3),
        "server_us_per_delivery": round(server.cpu * 1e6 / delivered, 2) if delivered else None,
        "total_us_per_delivery": (
            round((server.cpu + aux.cpu) * 1e6 / delivered, 2) if delivered else None
        ),
        "errors": report["errors"],
    }
    p99 = row["latency"]["p99_ms"]
    row["saturated"] = bool(
        expected == 0
        or delivered < 0.98 * expected
        or published["ok"] < 0.98 * rate * duration_s
        or (p99 is not None and p99 > 1000)
        or row["publisher_lag_max_ms"] > 500
    )
    log(
        f"  {target.key:<10} rate {rate:>6}/s: {row['deliveries_per_s']} deliveries/s, "
        f"p50 {row['latency']['p50_ms']} ms, p99 {p99} ms, lost {row['lost']}, "
        f"server {row['server_us_per_delivery']} µs/delivery (+aux {row['aux_cpu_s']} s), "
        f"gen {row['generator_cores']} cores{' SATURATED' if row['saturated'] else ''}"
    )
    return row


# --- scenarios ------------------------------------------------------------------------------


def _with_target(
    ctx: Context, target: Target, *, processes: int = 1, nodes: int = 1
) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def run() -> Any:
        target.start(ctx.workdir, processes=processes, nodes=nodes)
        try:
            yield
        finally:
            target.stop()

    return run()


def held(ctx: Context, targets: list[str]) -> list[dict[str, Any]]:
    """N connections opened and held, per target. With ``rounds`` > 1 the targets take
    turns (APIX, baseline, APIX, baseline...), so that a machine whose speed drifts during
    the run weighs on both alike; each target's row is its median round by CPU per
    connect, and every round's figures are kept beside it."""
    cfg = ctx.profile["held"]
    rows: list[dict[str, Any]] = []
    for n in cfg["connections"]:
        measured = _in_turns(
            ctx, targets, cfg.get("rounds", 1), functools.partial(_held_once, ctx, n)
        )
        for key in targets:
            row = _median_round(measured[key])
            rows.append(row)
            ctx.results.setdefault("held", []).append(row)
        ctx.save()
    return rows


def _in_turns(
    ctx: Context,
    keys: list[str],
    rounds: int,
    once: Callable[[str, str], dict[str, Any]],
    *,
    partial: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``once(key, suffix)`` for every key, ``rounds`` times, the keys taking turns (APIX,
    baseline, APIX, baseline...) so that a machine whose speed drifts during the run weighs
    on all alike. With ``partial``, each result is saved under that key of the results as it
    comes (a run cut short keeps the rounds done), and the key is dropped at the end."""
    measured: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
    for turn in range(rounds):
        for key in keys:
            measured[key].append(once(key, f", round {turn + 1}/{rounds}" if rounds > 1 else ""))
            if partial is not None:
                ctx.results.setdefault(partial, []).append(measured[key][-1])
                ctx.save()
    if partial is not None:
        ctx.results.pop(partial, None)
    return measured


def _median_round(measured: list[dict[str, Any]]) -> dict[str, Any]:
    ok = sorted(
        (r for r in measured if r.get("connect_server_cpu_us") is not None),
        key=lambda r: r["connect_server_cpu_us"],
    )
    if not ok:
        return measured[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    if len(measured) > 1:
        figures = (
            "connects_per_s",
            "connect_server_cpu_us",
            "kib_per_connection",
            "failed",
            "connect_server_switches",
            "connect_generator_cores",
        )
        # Every round's failures, not only the median's: they are what needs explaining.
        kept = (*figures, "open_errors", "error")
        row["rounds"] = [{k: r.get(k) for k in kept} for r in measured]
    return row


def _held_once(ctx: Context, n: int, key: str, suffix: str) -> dict[str, Any]:
    cfg = ctx.profile["held"]
    target = ctx.targets[key]
    procs = cfg.get("processes") or server_processes(n)
    log(f"held: {key}, {n} connections, {procs} server process(es){suffix}")
    try:
        with _with_target(ctx, target, processes=procs):
            time.sleep(1.0)
            rss0 = rss_bytes(target.server_pids())
            aux0 = rss_bytes(target.aux_pids())
            subs = loadgen.Subscribers(
                ctx.workdir,
                urls=target.ws_urls(),
                dialect=target.dialect,
                token=target.token,
                connections=n,
                channel_prefix="room:held",
                channel_count=max(1, n // 100),
            )
            try:
                server = CpuWindow(target.server_pids()).start()
                aux = CpuWindow(target.aux_pids()).start()
                gen = CpuWindow(subs.pids()).start()
                opened = subs.open(timeout=max(120, n / 50))
                server.stop()
                aux.stop()
                gen.stop()
                time.sleep(2.0)
                rss1 = rss_bytes(target.server_pids())
                aux1 = rss_bytes(target.aux_pids())
                idle = CpuWindow(target.server_pids()).start()
                idle_aux = CpuWindow(target.aux_pids()).start()
                gen_idle = CpuWindow(subs.pids()).start()
                time.sleep(cfg["idle_s"])
                idle.stop()
                idle_aux.stop()
                gen_idle.stop()
                still_open = subs.reset(0)
            finally:
                subs.close()
    except HarnessError as exc:
        log(f"  {key}: FAILED {exc}")
        return {"target": key, "connections": n, "error": str(exc)}
    ok = opened["ok"]
    row = {
        "target": key,
        "connections": n,
        "server_processes": procs,
        "opened": ok,
        "failed": opened["failed"],
        "open_errors": opened["errors"],
        "open_s": opened["seconds"],
        "connects_per_s": opened["connects_per_s"],
        "connect_server_cpu_us": round(server.cpu * 1e6 / ok, 1) if ok else None,
        "connect_aux_cpu_us": round(aux.cpu * 1e6 / ok, 1) if ok else None,
        "connect_generator_cores": round(gen.cpu / gen.wall, 3) if gen.wall else None,
        # Per connect: how often the server's processes waited, and were preempted.
        "connect_server_switches": ([round(s / ok, 2) for s in server.switches] if ok else None),
        "rss_idle_mib": round(rss0 / 2**20, 1),
        "rss_mib": round(rss1 / 2**20, 1),
        "kib_per_connection": round((rss1 - rss0) / 1024 / ok, 2) if ok else None,
        "aux_kib_per_connection": round((aux1 - aux0) / 1024 / ok, 2) if ok else None,
        "idle_s": cfg["idle_s"],
        "idle_server_cores": round(idle.cpu / idle.wall, 4),
        "idle_aux_cores": round(idle_aux.cpu / idle_aux.wall, 4),
        "idle_generator_cores": round(gen_idle.cpu / gen_idle.wall, 4),
        "still_open": still_open,
    }
    log(
        f"  {key}: opened {ok}/{n} in {row['open_s']} s ({row['connects_per_s']}/s), "
        f"{row['connect_server_cpu_us']} µs CPU/connect (+aux {row['connect_aux_cpu_us']}), "
        f"switches/connect {row['connect_server_switches']}, "
        f"{row['kib_per_connection']} KiB/conn, idle {row['idle_server_cores']} cores"
    )
    return row


def _warm_up(
    ctx: Context,
    target: Target,
    subs: loadgen.Subscribers,
    rate: float,
    prefix: str,
    channels: int,
    publisher_connections: int,
) -> dict[str, Any]:
    """Publish at ``rate`` unmeasured (`WARMUP_S`): what the first rate is measured after."""
    warmup_s = min(WARMUP_MAX_S, max(WARMUP_S, WARMUP_EVENTS / rate))
    log(f"  {target.key:<10} warm-up: {warmup_s:g} s at {rate}/s, not counted")
    warm = measure_publish(
        ctx,
        target,
        subs,
        rate=rate,
        duration_s=warmup_s,
        channel_prefix=prefix,
        channel_count=channels,
        publisher_connections=publisher_connections,
    )
    if warm["saturated"] or warm["lost"]:
        log(f"  {target.key:<10} the warm-up did not keep up: the first rate may start behind")
    return {k: warm[k] for k in ("rate", "duration_s", "delivered", "lost", "saturated", "latency")}


def _fanout_series(
    ctx: Context,
    target: Target,
    *,
    subscribers: int,
    channels: int,
    prefix: str,
    rates: list[float],
    duration_s: float,
    sweep: bool,
    nodes: int = 1,
    publisher_connections: int = 1,
) -> dict[str, Any]:
    """Open the subscribers once, then publish at each rate (stopping after saturation)."""
    series: dict[str, Any] = {
        "target": target.key,
        "subscribers": subscribers,
        "channels": channels,
        "nodes": nodes,
        "points": [],
    }
    with _with_target(ctx, target, processes=1, nodes=nodes):
        subs = loadgen.Subscribers(
            ctx.workdir,
            urls=target.ws_urls(),
            dialect=target.dialect,
            token=target.token,
            connections=subscribers,
            channel_prefix=prefix,
            channel_count=channels,
            processes=max(2, math.ceil(subscribers / loadgen.PER_PROCESS)),
        )
        try:
            series["open"] = subs.open(timeout=max(120, subscribers / 50))
            if series["open"]["ok"] < subscribers:
                log(f"  {target.key}: only {series['open']['ok']}/{subscribers} subscribed")
            time.sleep(1.0)
            if rates and rates[0] > 0:
                series["warmup"] = _warm_up(
                    ctx, target, subs, rates[0], prefix, channels, publisher_connections
                )
                time.sleep(1.0)
            for rate in rates:
                point = measure_publish(
                    ctx,
                    target,
                    subs,
                    rate=rate,
                    duration_s=duration_s,
                    channel_prefix=prefix,
                    channel_count=channels,
                    publisher_connections=publisher_connections,
                )
                series["points"].append(point)
                if sweep and point["saturated"]:
                    break
                time.sleep(1.0)
        finally:
            subs.close()
    return series


def fanout(ctx: Context, targets: list[str]) -> None:
    for cfg in ctx.profile["fanout"]:

        def sweep(key: str, suffix: str, cfg: dict[str, Any] = cfg) -> dict[str, Any]:
            log(f"fan-out: {key}, {cfg['subscribers']} subscribers on one channel{suffix}")
            try:
                return _fanout_series(
                    ctx,
                    ctx.targets[key],
                    subscribers=cfg["subscribers"],
                    channels=1,
                    prefix="room:bench",
                    rates=cfg["rates"],
                    duration_s=cfg["duration_s"],
                    sweep=cfg["sweep"],
                )
            except HarnessError as exc:
                log(f"  {key}: FAILED {exc}")
                return {"target": key, "subscribers": cfg["subscribers"], "error": str(exc)}

        measured = _in_turns(ctx, targets, cfg.get("rounds", 1), sweep, partial="fanout_rounds")
        for key in targets:
            ctx.results.setdefault("fanout", []).append(_median_series(measured[key]))
        ctx.save()


def _median_series(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One series from rounds of the same sweep: at each rate the round whose CPU per delivery
    is the median, and as the saturation figure the median of the rounds' peaks (not the
    best round's). Every round's figures stay in the series."""
    ok = [s for s in measured if "points" in s]
    if len(measured) == 1 or not ok:
        return measured[-1]
    merged = {k: v for k, v in ok[0].items() if k != "points"}
    merged["points"] = []
    for rate in sorted({p["rate"] for s in ok for p in s["points"]}):
        at_rate = sorted(
            (p for s in ok for p in s["points"] if p["rate"] == rate),
            key=lambda p: p["server_us_per_delivery"] or math.inf,
        )
        point = dict(at_rate[(len(at_rate) - 1) // 2])
        point["rounds"] = [
            {
                "deliveries_per_s": p["deliveries_per_s"],
                "server_us_per_delivery": p["server_us_per_delivery"],
                "p99_ms": p["latency"]["p99_ms"],
                "saturated": p["saturated"],
            }
            for p in at_rate
        ]
        merged["points"].append(point)
    peaks = sorted(max(p["deliveries_per_s"] for p in s["points"]) for s in ok if s["points"])
    merged["round_peaks"] = [
        max((p["deliveries_per_s"] for p in s["points"]), default=None) if "points" in s else None
        for s in measured
    ]
    merged["peak"] = peaks[(len(peaks) - 1) // 2] if peaks else None
    merged["round_errors"] = [s["error"] for s in measured if "error" in s]
    return merged


def many(ctx: Context, targets: list[str]) -> None:
    cfg = ctx.profile["many"]
    for key in targets:
        log(f"many channels: {key}, {cfg['connections']} connections over {cfg['channels']}")
        try:
            series = _fanout_series(
                ctx,
                ctx.targets[key],
                subscribers=cfg["connections"],
                channels=cfg["channels"],
                prefix="room:many",
                rates=cfg["rates"],
                duration_s=cfg["duration_s"],
                sweep=False,
                publisher_connections=4,
            )
        except HarnessError as exc:
            log(f"  {key}: FAILED {exc}")
            series = {"target": key, "error": str(exc)}
        ctx.results.setdefault("many", []).append(series)
        ctx.save()


def two_nodes(ctx: Context, targets: list[str]) -> None:
    if "apix" not in targets:
        return
    cfg = ctx.profile["two_nodes"]
    for nodes in (1, 2):
        log(f"two nodes: APIX on {nodes} node(s), {cfg['subscribers']} subscribers")
        try:
            series = _fanout_series(
                ctx,
                ctx.targets["apix"],
                subscribers=cfg["subscribers"],
                channels=1,
                prefix="room:nodes",
                rates=cfg["rates"],
                duration_s=cfg["duration_s"],
                sweep=False,
                nodes=nodes,
            )
        except HarnessError as exc:
            log(f"  FAILED {exc}")
            series = {"target": "apix", "nodes": nodes, "error": str(exc)}
        ctx.results.setdefault("two_nodes", []).append(series)
        ctx.save()


def http_publish(ctx: Context, targets: list[str]) -> None:
    """Closed-loop HTTP publish, per target. With ``rounds`` > 1 the targets take turns, as
    in `held`; each target's row is its median round by events/s, every round kept beside
    it."""
    cfg = ctx.profile["http"]
    rounds = max(1, cfg.get("rounds", 1))
    keys = [key for key in targets if ctx.targets[key].http_publish]
    measured = _in_turns(
        ctx, keys, rounds, lambda key, suffix: _http_once(ctx, key, suffix), partial="http_rounds"
    )
    for key in keys:
        ok = sorted(
            (r for r in measured[key] if "events_per_s" in r), key=lambda r: r["events_per_s"]
        )
        row = dict(ok[(len(ok) - 1) // 2]) if ok else measured[key][-1]
        if rounds > 1:
            figures = (
                "events_per_s",
                "server_us_per_event",
                "total_us_per_event",
                "errors",
                "error",
            )
            row["rounds"] = [
                {**{k: r.get(k) for k in figures}, "p99_ms": r.get("latency", {}).get("p99_ms")}
                for r in measured[key]
            ]
        ctx.results.setdefault("http", []).append(row)
    ctx.save()


def _http_once(ctx: Context, key: str, suffix: str) -> dict[str, Any]:
    cfg = ctx.profile["http"]
    target = ctx.targets[key]
    processes = cfg.get("processes", 1)
    log(f"HTTP publish: {key}, concurrency {cfg['concurrency']}, {processes} process(es){suffix}")
    try:
        with _with_target(ctx, target, processes=processes):
            run = ctx.next_run()
            url, headers = target.http_url("room:http", cfg.get("credential", "token"))
            gen = loadgen.publisher(
                ctx.workdir,
                f"gen-http-{run}",
                {
                    "mode": "http",
                    "http_url": url,
                    "headers": headers,
                    "concurrency": cfg["concurrency"],
                    "duration_s": cfg["duration_s"],
                    "run": run,
                    "pad": PAD,
                },
            )
            try:
                server = CpuWindow(target.server_pids()).start()
                aux = CpuWindow(target.aux_pids()).start()
                parts = {k: CpuWindow([p]).start() for k, p in target.aux_parts().items()}
                gens = CpuWindow([gen.pid]).start()
                gen.send({"cmd": "go"})
                result = gen.expect("published", cfg["duration_s"] + 60)
                server.stop()
                aux.stop()
                for part in parts.values():
                    part.stop()
                gens.stop()
            finally:
                gen.stop(timeout=5)
    except HarnessError as exc:
        log(f"  {key}: FAILED {exc}")
        return {"target": key, "error": str(exc)}
    seconds = result["elapsed_us"] / 1e6
    ok = result["ok"]
    row = {
        "target": key,
        "concurrency": cfg["concurrency"],
        "server_processes": processes,
        "duration_s": cfg["duration_s"],
        "ok": ok,
        "statuses": result["statuses"],
        "errors": result["errors"],
        "events_per_s": round(ok / seconds, 1),
        "latency": loadgen.merged(result["latency"]),
        "server_cores": round(server.cpu / server.wall, 3),
        "aux_cores": round(aux.cpu / aux.wall, 3),
        "server_us_per_event": round(server.cpu * 1e6 / ok, 1) if ok else None,
        "total_us_per_event": round((server.cpu + aux.cpu) * 1e6 / ok, 1) if ok else None,
        "generator_cores": round(gens.cpu / gens.wall, 3),
        "aux_us_per_event": round(aux.cpu * 1e6 / ok, 1) if ok else None,
    }
    if parts and ok:  # which of Redis, PostgreSQL and the archiver the aux CPU went to
        row["aux_us_per_event_parts"] = {k: round(w.cpu * 1e6 / ok, 1) for k, w in parts.items()}
    if "credential" in cfg:
        row["credential"] = cfg["credential"]
    log(
        f"  {key}: {row['events_per_s']} events/s, p50 {row['latency']['p50_ms']} ms, "
        f"p99 {row['latency']['p99_ms']} ms, server {row['server_us_per_event']} µs/event, "
        f"aux {row['aux_us_per_event']} µs/event {row.get('aux_us_per_event_parts', '')}"
    )
    return row


def _pyspy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def _record(pid: int, seconds: float, raw: Path, svg: Path) -> list[str]:
    """py-spy, non-blocking, 250 Hz: collapsed stacks and a flame graph of the same window."""
    pyspy = _pyspy()
    assert pyspy is not None
    common = ["record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
    common += ["--duration", str(int(seconds))]
    runs = [
        subprocess.Popen(
            [pyspy, *common, "--format", fmt, "--output", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for fmt, path in (("raw", raw), ("flamegraph", svg))
    ]
    errors = []
    for run in runs:
        try:
            _, err = run.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            run.kill()
            _, err = run.communicate()
        if run.returncode != 0:
            errors.append(err[-500:])
    return errors


def profile(ctx: Context, targets: list[str]) -> None:
    """py-spy on APIX's gateway process: fan-out at saturation, HTTP publish, connects.

    Each gives a flame graph in docs/ and a self/inclusive top list in the results.
    """
    if "apix" not in targets:
        return
    if _pyspy() is None:
        log("profile: py-spy not installed (pip install py-spy); skipped")
        return
    cfg = ctx.profile["profile"]
    target = ctx.targets["apix"]
    seconds = cfg["seconds"]
    out: dict[str, Any] = {}
    ctx.results["profile"] = out
    raw_dir = ctx.keep_dir or ctx.workdir
    raw_dir.mkdir(parents=True, exist_ok=True)

    def finish(name: str, info: dict[str, Any], raw: Path, svg: Path) -> None:
        if raw.exists():
            info.update(summarise_profile(raw.read_text()))
        info["flamegraph"] = svg.name if svg.exists() else None
        out[name] = info
        ctx.save()

    # 1. Fan-out at saturation.
    raw, svg = raw_dir / "fanout.pyspy.txt", ctx.docs_dir / "apix-fanout-flame.svg"
    info: dict[str, Any] = {"rate": cfg["rate"], "subscribers": cfg["subscribers"]}

    def during_factory(info: dict[str, Any], raw: Path, svg: Path) -> Callable[[Proc], None]:
        def during(_pub: Proc) -> None:
            time.sleep(1.0)
            info["errors"] = _record(target.worker_pids()[0], seconds, raw, svg)

        return during

    log(f"profile: APIX fan-out, {cfg['subscribers']} subscribers at {cfg['rate']}/s, py-spy")
    try:
        with _with_target(ctx, target):
            subs = loadgen.Subscribers(
                ctx.workdir,
                urls=target.ws_urls(),
                dialect=target.dialect,
                token=target.token,
                connections=cfg["subscribers"],
                channel_prefix="room:profile",
                channel_count=1,
                processes=2,
            )
            try:
                subs.open()
                info["point"] = measure_publish(
                    ctx,
                    target,
                    subs,
                    rate=cfg["rate"],
                    duration_s=seconds + 3,
                    channel_prefix="room:profile",
                    channel_count=1,
                    during=during_factory(info, raw, svg),
                )
            finally:
                subs.close()
    except HarnessError as exc:
        log(f"  FAILED {exc}")
        info["errors"] = [str(exc)]
    finish("fanout", info, raw, svg)

    # 2. Many channels: the per-event (publish) path, amortised over few subscribers.
    many_cfg = ctx.profile["many"]
    raw, svg = raw_dir / "publish.pyspy.txt", ctx.docs_dir / "apix-publish-flame.svg"
    info = {
        "rate": many_cfg["rates"][-1],
        "connections": many_cfg["connections"],
        "channels": many_cfg["channels"],
    }
    log(f"profile: APIX many channels at {info['rate']}/s, py-spy")
    try:
        with _with_target(ctx, target):
            subs = loadgen.Subscribers(
                ctx.workdir,
                urls=target.ws_urls(),
                dialect=target.dialect,
                token=target.token,
                connections=many_cfg["connections"],
                channel_prefix="room:profile-many",
                channel_count=many_cfg["channels"],
            )
            try:
                subs.open()
                info["point"] = measure_publish(
                    ctx,
                    target,
                    subs,
                    rate=info["rate"],
                    duration_s=seconds + 3,
                    channel_prefix="room:profile-many",
                    channel_count=many_cfg["channels"],
                    publisher_connections=4,
                    during=during_factory(info, raw, svg),
                )
            finally:
                subs.close()
    except HarnessError as exc:
        log(f"  FAILED {exc}")
        info["errors"] = [str(exc)]
    finish("publish", info, raw, svg)

    # 3. Connects + subscribes (the connection storm).
    raw, svg = raw_dir / "connect.pyspy.txt", ctx.docs_dir / "apix-connect-flame.svg"
    info = {"connections": cfg["connect_connections"]}
    log(f"profile: APIX connects, {cfg['connect_connections']} connections, py-spy")
    try:
        with _with_target(ctx, target):
            subs = loadgen.Subscribers(
                ctx.workdir,
                urls=target.ws_urls(),
                dialect=target.dialect,
                token=target.token,
                connections=cfg["connect_connections"],
                channel_prefix="room:profile-connect",
                channel_count=max(1, cfg["connect_connections"] // 100),
            )
            try:
                recorder = threading.Thread(
                    target=lambda: info.update(
                        errors=_record(target.worker_pids()[0], seconds, raw, svg)
                    )
                )
                recorder.start()
                info["open"] = subs.open()
                recorder.join(timeout=seconds + 90)
            finally:
                subs.close()
    except HarnessError as exc:
        log(f"  FAILED {exc}")
        info["errors"] = [str(exc)]
    finish("connect", info, raw, svg)

    # 4. HTTP publish at concurrency 32.
    raw, svg = raw_dir / "http.pyspy.txt", ctx.docs_dir / "apix-http-publish-flame.svg"
    info = {"concurrency": ctx.profile["http"]["concurrency"]}
    log("profile: APIX HTTP publish, py-spy")
    try:
        with _with_target(ctx, target):
            url, headers = target.http_url("room:http")
            gen = loadgen.publisher(
                ctx.workdir,
                "gen-http-profile",
                {
                    "mode": "http",
                    "http_url": url,
                    "headers": headers,
                    "concurrency": info["concurrency"],
                    "duration_s": seconds + 3,
                    "run": ctx.next_run(),
                    "pad": PAD,
                },
            )
            try:
                gen.send({"cmd": "go"})
                time.sleep(1.0)
                info["errors"] = _record(target.worker_pids()[0], seconds, raw, svg)
                result = gen.expect("published", seconds + 60)
                info["events_per_s"] = round(result["ok"] / (result["elapsed_us"] / 1e6), 1)
            finally:
                gen.stop(timeout=5)
    except HarnessError as exc:
        log(f"  FAILED {exc}")
        info["errors"] = [str(exc)]
    finish("http", info, raw, svg)


# Frames every stack passes through (interpreter, CLI, event loop): not hot spots.
_ROOTS = (
    "runpy",
    "typer/",
    "_click/",
    "apix/cli.py",
    "apix/__main__.py",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
)


# APIX frames every gateway stack passes through.
_APIX_ENTRY = ("apix/cli.py", "apix/__main__.py", "_WebSocketEndpoint", "Gateway.__call__")


def summarise_profile(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function (and self per line) from py-spy's
    collapsed stacks; `inclusive_apix` counts APIX's own functions only."""
    selfs: dict[str, int] = {}
    lines: dict[str, int] = {}
    incl: dict[str, int] = {}
    incl_apix: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        raw_frames = stack.split(";")
        frames = [_frame_name(f) for f in raw_frames]
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
        leaf = _frame_name(raw_frames[-1], with_line=True)
        lines[leaf] = lines.get(leaf, 0) + count
        for name in set(frames):
            if not any(root in name for root in _ROOTS):
                incl[name] = incl.get(name, 0) + count
        for name in {_frame_name(f) for f in raw_frames if _is_apix(f)}:
            if not any(skip in name for skip in _APIX_ENTRY):
                incl_apix[name] = incl_apix.get(name, 0) + count

    def ranked(d: dict[str, int]) -> list[dict[str, Any]]:
        best = sorted(d.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [{"function": k, "share": round(v / total, 4)} for k, v in best]

    return {
        "samples": total,
        "self": ranked(selfs),
        "self_lines": ranked(lines),
        "inclusive": ranked(incl),
        "inclusive_apix": ranked(incl_apix),
    }


def _is_apix(frame: str) -> bool:
    where = frame.partition(" (")[2]
    return where.startswith("apix/") or "/apix/" in where


def _frame_name(frame: str, *, with_line: bool = False) -> str:
    # "function (path/to/module.py:123)" -> "function (pkg/module.py)" [":123"]
    name, _, where = frame.partition(" (")
    path, _, lineno = where.rstrip(")").rpartition(":")
    short = "/".join(path.split("/")[-2:]) if path else "?"
    return f"{name} ({short}:{lineno})" if with_line else f"{name} ({short})"


SCENARIO_FUNCS: dict[str, Callable[[Context, list[str]], Any]] = {
    "held": held,
    "fanout": fanout,
    "many": many,
    "http": http_publish,
    "two_nodes": two_nodes,
    "profile": profile,
}


def apix_target(ctx: Context) -> Apix:
    target = ctx.targets["apix"]
    assert isinstance(target, Apix)
    return target
