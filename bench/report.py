"""Render docs/benchmarks.md and its charts from one results file.

The prose that is not computed (method, hot-spot analysis) lives in bench/notes/*.md and is
copied in, so regenerating the doc never loses it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOTES = Path(__file__).resolve().parent / "notes"
LABELS = {
    "apix": "APIX",
    "websockets": "bare websockets",
    "fastapi": "bare FastAPI/uvicorn",
    "socketio": "python-socketio",
    "node-ws": "Node ws",
}
COLORS = {
    "apix": "#d62728",
    "websockets": "#1f77b4",
    "fastapi": "#2ca02c",
    "socketio": "#9467bd",
    "node-ws": "#7f7f7f",
}


def generator_client(results: dict[str, Any]) -> str:
    """The load generator's WebSocket client in a results file's own run (`ws`' before
    bench/node/rawws.js)."""
    versions = results.get("versions", {})
    fallback = f"ws {versions.get('ws (npm)', '?')}"
    return str(versions.get("load generator's client", fallback))


def render(result_path: Path, docs: Path) -> Path:
    results = json.loads(result_path.read_text())
    charts = _charts(results, docs)
    text = _document(results, result_path, charts)
    out = docs / "benchmarks.md"
    out.write_text(text)
    return out


# --- helpers -----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "\u2013"
    return f"{a / b:.2f}\u00d7"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _note(name: str) -> str:
    path = NOTES / name
    return path.read_text().strip() if path.exists() else ""


def _label(key: str) -> str:
    return LABELS.get(key, key)


def _points(series_list: list[dict[str, Any]], subscribers: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for series in series_list:
        if series.get("subscribers") == subscribers and "points" in series:
            out[series["target"]] = series["points"]
    return out


def _peak(series: dict[str, Any]) -> float | None:
    """A series' most deliveries/s: with rounds, the median of the rounds' peaks."""
    if series.get("peak") is not None:
        return float(series["peak"])
    return max((float(p["deliveries_per_s"]) for p in series.get("points", [])), default=None)


def _at_rate(points: list[dict[str, Any]], rate: float) -> dict[str, Any] | None:
    return next((p for p in points if p["rate"] == rate), None)


# --- charts ------------------------------------------------------------------------------


def _charts(results: dict[str, Any], docs: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts: dict[str, str] = {}
    fanout = results.get("fanout", [])
    sizes = sorted({s["subscribers"] for s in fanout if "points" in s})
    if sizes:
        fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.5), squeeze=False)
        for ax, n in zip(axes[0], sizes, strict=True):
            for key, points in _points(fanout, n).items():
                xs = [p["offered_deliveries_per_s"] for p in points]
                p50 = [p["latency"]["p50_ms"] for p in points]
                p99 = [p["latency"]["p99_ms"] for p in points]
                c = COLORS.get(key)
                ax.plot(xs, p99, "o-", color=c, label=f"{_label(key)} p99")
                ax.plot(xs, p50, "x--", color=c, alpha=0.6, label=f"{_label(key)} p50")
            ax.set_yscale("log")
            ax.set_xlabel("offered deliveries/s (events/s \u00d7 subscribers)")
            ax.set_ylabel("publish → receive latency, ms (log)")
            ax.set_title(f"Fan-out, one channel, {n:,} subscribers")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(docs / "bench-fanout-latency.png", dpi=110)
        plt.close(fig)
        charts["latency"] = "bench-fanout-latency.png"

        # Server CPU per delivered event, every fan-out point that every target has.
        fig, ax = plt.subplots(figsize=(9, 4.5))
        groups: list[str] = []
        values: dict[str, list[float]] = {}
        for n in sizes:
            per_target = _points(fanout, n)
            rates = sorted({p["rate"] for pts in per_target.values() for p in pts})
            for rate in rates:
                groups.append(f"{n:,} subs\n{rate:g} ev/s")
                for key, pts in per_target.items():
                    p = _at_rate(pts, rate)
                    values.setdefault(key, []).append(
                        (p["server_us_per_delivery"] or 0) if p else 0
                    )
        width = 0.8 / max(1, len(values))
        for i, (key, vals) in enumerate(values.items()):
            xs = [g + i * width for g in range(len(groups))]
            ax.bar(xs, vals, width, label=_label(key), color=COLORS.get(key))
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
        ax.set_ylabel("server CPU µs per delivered event")
        ax.set_title("Server CPU per delivered event (lower is better)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / "bench-cpu-per-delivery.png", dpi=110)
        plt.close(fig)
        charts["cpu"] = "bench-cpu-per-delivery.png"

    held = [r for r in results.get("held", []) if r.get("kib_per_connection") is not None]
    if held:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in dict.fromkeys(r["target"] for r in held):
            rows = sorted((r for r in held if r["target"] == key), key=lambda r: r["connections"])
            ax.plot(
                [r["connections"] for r in rows],
                [r["kib_per_connection"] for r in rows],
                "o-",
                color=COLORS.get(key),
                label=_label(key),
            )
        ax.axhline(20, color=COLORS["apix"], ls=":", lw=1, label="issue 5 bar for APIX (at 50k)")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log")
        ax.set_xlabel("connections held (connected + subscribed)")
        ax.set_ylabel("server RSS per connection, KiB")
        ax.set_title("Memory per idle connection")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / "bench-memory.png", dpi=110)
        plt.close(fig)
        charts["memory"] = "bench-memory.png"
    return charts


# --- the document ------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """The results file as a path from the repository's root (bench/results/ or bench/notes/)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return f"bench/results/{path.name}"


def _document(results: dict[str, Any], path: Path, charts: dict[str, str]) -> str:
    profile = results["config"]
    machine = results["machine"]
    quick = profile["name"] == "quick"
    parts: list[str] = ["# Benchmarks", ""]
    parts.append(
        f"Generated by `python -m bench run{' --quick' if quick else ''}` from "
        f"`{_shown(path)}` (started {results['started_at']}, "
        f"{results.get('elapsed_s', '?')} s). Do not edit by hand: `python -m bench report` "
        "regenerates this page; the prose comes from `bench/notes/`."
    )
    parts.append("")
    load = machine.get("load_average_at_start")
    if quick:
        parts.append(
            "> **Quick run on a shared machine.** These numbers come from the `--quick` profile "
            "(1k connections, ~10 s per measurement, no saturation sweeps), measured while other "
            f"work was using the same 2 cores (load average {load} when the run started). They "
            "show the relative cost of the servers, not what the full profile would give; run "
            "`python -m bench run` on an otherwise idle machine for the numbers of record."
        )
    else:
        parts.append(f"> Full profile. Load average when the run started: {load}.")
    if results.get("note"):
        parts += ["", f"> {results['note']}"]
    own_client = generator_client(results)
    for update in results.get("updates", []):
        source = f", APIX source {update['source']}" if update.get("source") else ""
        if update.get("client", own_client) != own_client:
            source += f", the generator's client {update['client']}"
        if update.get("cpu", machine["cpu"]) != machine["cpu"]:
            source += f", on {update['cpu']}"
        parts += [
            "",
            f"> Re-run into this file at {update['at']} (`--update`{source}): "
            f"{', '.join(update['scenarios'])} for {', '.join(update['targets'])}."
            + (f" {update['note']}" if update.get("note") else ""),
        ]
    if results.get("interrupted"):
        parts += ["", "> **The run was interrupted; some scenarios are missing.**"]
    parts += ["", _note("method.md"), ""]
    parts += ["## Machine and versions", ""]
    parts.append(
        _table(
            ["what", "value"],
            [
                ["CPU", f"{machine['cpu']} \u00d7 {machine['cores']} cores"],
                ["memory", f"{machine['memory_gib']} GiB"],
                ["kernel", f"{machine['kernel']}"],
                ["open-files limit (per process)", f"{machine['open_files_limit']:,}"],
            ]
            + [[k, v] for k, v in results["versions"].items()],
        )
    )
    parts += ["", _targets(results), ""]
    parts += _held(results, charts)
    parts += _fanout(results, charts)
    parts += _many(results)
    parts += _http(results)
    parts += _two_nodes(results)
    parts += _profile(results)
    return "\n".join(parts).rstrip() + "\n"


def _best_points(results: dict[str, Any], subscribers: int) -> dict[str, list[dict[str, Any]]]:
    return _points(results.get("fanout", []), subscribers)


def _targets(results: dict[str, Any]) -> str:
    """Issue 5's bars, checked against this run."""
    rows: list[list[str]] = []
    fanout = results.get("fanout", [])
    sizes = sorted({s["subscribers"] for s in fanout if "points" in s})
    swept = any(c.get("sweep") for c in results["config"]["fanout"])
    cpu_ratios: list[float] = []
    cpu_total_ratios: list[float] = []
    for n in sizes:
        pts = _points(fanout, n)
        for p in pts.get("apix", []):
            base = _at_rate(pts.get("websockets", []), p["rate"])
            if base and p["server_us_per_delivery"] and base["server_us_per_delivery"]:
                cpu_ratios.append(p["server_us_per_delivery"] / base["server_us_per_delivery"])
                cpu_total_ratios.append(p["total_us_per_delivery"] / base["server_us_per_delivery"])
    if cpu_ratios:
        worst = max(cpu_ratios)
        rows.append(
            [
                "server CPU per delivered event (fan-out) ≤ 1.0\u00d7 bare websockets "
                "(stretch ≤ 0.5\u00d7)",
                f"{min(cpu_ratios):.2f}\u00d7 \u2013 {worst:.2f}\u00d7 (with Redis + PostgreSQL: "
                f"{min(cpu_total_ratios):.2f}\u00d7 \u2013 {max(cpu_total_ratios):.2f}\u00d7)",
                "met" if worst <= 1.0 else f"**missed** by {worst - 1:.0%}",
            ]
        )

    def peak(key: str) -> float | None:
        vals = [v for s in fanout if s.get("target") == key and (v := _peak(s)) is not None]
        return max(vals) if vals else None

    apix_peak, ws_peak, sio_peak = peak("apix"), peak("websockets"), peak("socketio")
    if apix_peak and ws_peak:
        qualifier = "" if swept else " (no sweep in this run: the highest rate measured)"
        ratio = apix_peak / ws_peak
        rows.append(
            [
                "fan-out deliveries/s at saturation ≥ 1.0\u00d7 bare websockets" + qualifier,
                f"{apix_peak:,.0f} vs {ws_peak:,.0f} ({ratio:.2f}\u00d7)",
                "met" if ratio >= 1.0 else f"**missed** by {1 - ratio:.0%}",
            ]
        )
    if apix_peak and sio_peak:
        ratio = apix_peak / sio_peak
        rows.append(
            [
                "… and ≥ 3\u00d7 python-socketio",
                f"{apix_peak:,.0f} vs {sio_peak:,.0f} ({ratio:.2f}\u00d7)",
                "met" if ratio >= 3 else "**missed**",
            ]
        )
    if 1000 in sizes:
        pts = _points(fanout, 1000)
        ws_pts, apix_pts = pts.get("websockets", []), pts.get("apix", [])
        if ws_pts and apix_pts:
            sat = [p["deliveries_per_s"] for p in ws_pts if p["saturated"]]
            half = (sat[0] if sat else max(p["deliveries_per_s"] for p in ws_pts)) / 2
            usable = [p for p in ws_pts if p["offered_deliveries_per_s"] <= half] or ws_pts[:1]
            base = usable[-1]
            mine = _at_rate(apix_pts, base["rate"])
            if mine and base["latency"]["p99_ms"] and mine["latency"]["p99_ms"]:
                ratio = mine["latency"]["p99_ms"] / base["latency"]["p99_ms"]
                where = (
                    f"at {base['rate']:g} events/s"
                    if sat
                    else f"at {base['rate']:g} events/s (the bare server did not saturate here)"
                )
                rows.append(
                    [
                        "p99 at half the bare server's saturation rate, 1k subscribers, "
                        "≤ 1.2\u00d7",
                        f"{mine['latency']['p99_ms']:.1f} ms vs {base['latency']['p99_ms']:.1f} "
                        f"ms ({ratio:.1f}\u00d7) {where}",
                        "met" if ratio <= 1.2 else "**missed**",
                    ]
                )
            lost = sum(p["lost"] for p in apix_pts if not p["saturated"])
            rows.append(
                [
                    "0 lost events below saturation",
                    f"{lost} lost",
                    "met" if lost == 0 else "**missed**",
                ]
            )
    held = [r for r in results.get("held", []) if r["target"] == "apix" and r.get("opened")]
    if held:
        top = max(held, key=lambda r: r["connections"])
        kib = top["kib_per_connection"]
        rows.append(
            [
                "≤ 20 KiB RSS per idle authenticated subscribed connection at 50k",
                f"{kib:.1f} KiB at {top['connections']:,}"
                + ("" if top["connections"] >= 50_000 else " (50k not run)"),
                "met" if kib <= 20 else f"**missed** by {kib / 20 - 1:.0%}",
            ]
        )
        cps = top["connects_per_s"]
        rows.append(
            [
                "≥ 2,000 authenticated connects+subscribes per second",
                f"{cps:,.0f}/s ({top['failed']} failed)",
                "met" if cps >= 2000 and not top["failed"] else "**missed**",
            ]
        )
    http = [r for r in results.get("http", []) if r["target"] == "apix" and "events_per_s" in r]
    if http:
        r = http[0]
        good = r["events_per_s"] >= 5000 and (r["latency"]["p99_ms"] or 1e9) <= 25
        rows.append(
            [
                "HTTP publish ≥ 5,000 events/s per node at p99 ≤ 25 ms",
                f"{r['events_per_s']:,.0f}/s, p99 {r['latency']['p99_ms']:.1f} ms",
                "met" if good else "**missed**",
            ]
        )
    prof = results.get("profile", {}).get("fanout", {})
    rows.append(
        [
            "py-spy flame graph of the fan-out path in docs/",
            f"`docs/{prof['flamegraph']}`" if prof.get("flamegraph") else "not recorded",
            "done" if prof.get("flamegraph") else "**missing**",
        ]
    )
    intro = (
        "## Against the targets of issue 5\n\nEach bar is a ratio to a baseline measured in "
        "the same run. Where a bar is missed, the sections below and the hot-spot analysis "
        "say why."
    )
    return intro + "\n\n" + _table(["target", "this run", "verdict"], rows)


def _switches(per_connect: list[float] | None) -> str:
    if not per_connect:
        return "\u2013"  # not measured before the thirteenth session
    return f"{per_connect[0]:.2f} / {per_connect[1]:.2f}"


def _held(results: dict[str, Any], charts: dict[str, str]) -> list[str]:
    rows = results.get("held", [])
    if not rows:
        return []
    out = ["## 1. Connections held", ""]
    out.append(
        "N connections, each authenticated (APIX: a real access token) and subscribed to one "
        "channel (100 connections per channel), heartbeats on (APIX: protocol ping every 25 s; "
        "websockets, uvicorn and Node ws: WebSocket pings every 20 s; Socket.IO: 25 s). "
        "RSS per connection = (server RSS after opening \u2212 RSS before) ÷ N; APIX's Redis and "
        "PostgreSQL are listed apart (“aux”), and so is the CPU they and the event archiver "
        "(`apix worker`) spent while the connections opened (each connect and subscribe "
        "publishes two `monitor` events; since the fifth session they are no longer archived). "
        "*Server switches per connect*: how often the server's processes stopped to wait for "
        "input, and how often they were taken off a core while they still had work "
        "(preempted: the cores were contended); *generator cores*: the load generator's CPU "
        "while the connections opened."
    )
    out.append("")
    table: list[list[str]] = []
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_n.setdefault(r["connections"], {})[r["target"]] = r
    for n, per in sorted(by_n.items()):
        apix = per.get("apix", {})
        for key, r in per.items():
            if "error" in r:
                table.append([_label(key), f"{n:,}", "failed: " + r["error"][:80]] + [""] * 11)
                continue
            table.append(
                [
                    _label(key),
                    f"{n:,}",
                    f"{r['opened']:,}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
                    _fmt(r["open_s"], 2),
                    _fmt(r["connects_per_s"], 0),
                    _fmt(r["connect_server_cpu_us"], 0),
                    _fmt(r.get("connect_aux_cpu_us"), 0) if key == "apix" else "",
                    _switches(r.get("connect_server_switches")),
                    _fmt(r.get("connect_generator_cores"), 2),
                    _fmt(r["kib_per_connection"]),
                    _fmt(r["aux_kib_per_connection"]) if key == "apix" else "",
                    _ratio(apix.get("kib_per_connection"), r["kib_per_connection"]),
                    f"{r['idle_server_cores'] * 100:.2f}%",
                    str(r["server_processes"]),
                ]
            )
    out.append(
        _table(
            [
                "server",
                "N",
                "opened",
                "time to open, s",
                "connects/s",
                "server CPU µs per connect",
                "aux CPU µs per connect",
                "server switches per connect (waited / preempted)",
                "generator cores",
                "KiB per connection",
                "aux KiB/conn",
                "APIX ÷ this (KiB)",
                "idle CPU (1 core = 100%)",
                "server processes",
            ],
            table,
        )
    )
    out += _rounds_note(
        rows,
        "connect_server_cpu_us",
        "CPU per connect",
        "Server CPU µs per connect",
        lambda r: f"{_label(r['target'])} at {r['connections']:,}",
    )
    errors = {r["target"]: r["open_errors"] for r in rows if r.get("open_errors")}
    if errors:
        out += [
            "",
            "Connect failures: " + "; ".join(f"{_label(k)}: {v}" for k, v in errors.items()),
        ]
    if "memory" in charts:
        out += ["", f"![memory per connection]({charts['memory']})"]
    return [*out, ""]


def _point_rows(per_target: dict[str, list[dict[str, Any]]], rates: list[float]) -> list[list[str]]:
    rows: list[list[str]] = []
    for rate in rates:
        apix = _at_rate(per_target.get("apix", []), rate)
        for key, pts in per_target.items():
            p = _at_rate(pts, rate)
            if p is None:
                continue
            lat = p["latency"]
            rows.append(
                [
                    _label(key),
                    f"{rate:g}",
                    _fmt(p["offered_deliveries_per_s"], 0),
                    _fmt(p["deliveries_per_s"], 0) + (" (sat.)" if p["saturated"] else ""),
                    _fmt(lat["p50_ms"]),
                    _fmt(lat["p99_ms"]),
                    _fmt(lat["p999_ms"]),
                    _fmt(lat["max_ms"]),
                    f"{p['lost']:,}",
                    _fmt(p["server_us_per_delivery"]),
                    _fmt(p["total_us_per_delivery"]) if key == "apix" else "",
                    _ratio(apix and apix["server_us_per_delivery"], p["server_us_per_delivery"]),
                    _ratio(apix and apix["latency"]["p99_ms"], lat["p99_ms"]),
                    _fmt(p["server_cores"], 2),
                    _fmt(p["generator_cores"], 2),
                    _fmt(p["frame_bytes"], 0),
                ]
            )
    return rows


POINT_HEADER = [
    "server",
    "events/s",
    "offered deliveries/s",
    "delivered/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "lost",
    "server CPU µs/delivery",
    "+ Redis/PG µs",
    "APIX ÷ this (CPU)",
    "APIX ÷ this (p99)",
    "server cores",
    "generator cores",
    "frame bytes",
]


def _fanout(results: dict[str, Any], charts: dict[str, str]) -> list[str]:
    fanout = results.get("fanout", [])
    if not fanout:
        return []
    out = ["## 2. Fan-out: one channel", ""]
    out.append(
        "One publisher connection publishes at a fixed rate (open loop); every subscriber of "
        "the channel receives every event. *delivered/s* counts events received by all "
        "subscribers over the window from the first intended send to the last delivery; "
        "*(sat.)* marks a point where the server fell behind (backlog, lost events, p99 over "
        "1 s or the publisher more than 0.5 s late). *+ Redis/PG* is APIX's CPU per delivery "
        "including its Redis and PostgreSQL."
    )
    for series in fanout:
        if "error" in series:
            out += ["", f"{_label(series['target'])}: **failed**: {series['error'][:200]}"]
    sizes = sorted({s["subscribers"] for s in fanout if "points" in s})
    for n in sizes:
        per = _points(fanout, n)
        rates = sorted({p["rate"] for pts in per.values() for p in pts})
        out += ["", f"### {n:,} subscribers", ""]
        out.append(_table(POINT_HEADER, _point_rows(per, rates)))
        of_size = [s for s in fanout if s.get("subscribers") == n and "points" in s]
        peaks = {s["target"]: _peak(s) or 0.0 for s in of_size}
        out += _fanout_rounds_note(of_size)
        apix_peak = peaks.get("apix")
        out += [
            "",
            "Most deliveries/s seen: "
            + ", ".join(
                f"{_label(k)} {v:,.0f}"
                + (f" (APIX ÷ this {apix_peak / v:.2f}\u00d7)" if apix_peak and k != "apix" else "")
                for k, v in peaks.items()
            )
            + ".",
        ]
    for name, alt in (("latency", "fan-out latency"), ("cpu", "CPU per delivery")):
        if name in charts:
            out += ["", f"![{alt}]({charts[name]})"]
    return [*out, ""]


def _fanout_rounds_note(series_list: list[dict[str, Any]]) -> list[str]:
    """Under a fan-out table whose targets took turns: how its points were chosen."""
    rounds = max((len(s.get("round_peaks", [])) for s in series_list), default=0)
    if rounds < 2:
        return []
    peaks = "; ".join(
        f"{_label(s['target'])} "
        + " / ".join(_fmt(p, 0) if p is not None else "failed" for p in s["round_peaks"])
        for s in series_list
        if s.get("round_peaks")
    )
    return [
        "",
        f"The targets took turns, {rounds} rounds of the whole sweep each: every point is the "
        "round whose CPU per delivery was the median at that rate, and *most deliveries/s* "
        "below is the median of the rounds' peaks (each round's: "
        + peaks
        + "). Every round's figures are in the results file.",
    ]


def _many(results: dict[str, Any]) -> list[str]:
    series_list = [s for s in results.get("many", []) if "points" in s]
    if not series_list:
        return []
    cfg = results["config"]["many"]
    out = ["## 3. Many channels", ""]
    out.append(
        f"{cfg['connections']:,} connections over {cfg['channels']:,} channels "
        f"({cfg['connections'] // cfg['channels']} per channel); events spread round-robin over "
        "the channels by 4 publisher connections."
    )
    per = {s["target"]: s["points"] for s in series_list}
    rates = sorted({p["rate"] for pts in per.values() for p in pts})
    out += ["", _table(POINT_HEADER, _point_rows(per, rates))]
    opened = {s["target"]: s.get("open", {}) for s in series_list}
    failed = {k: v for k, v in opened.items() if v.get("failed")}
    if failed:
        out += [
            "",
            "Subscriptions that failed to open: "
            + "; ".join(f"{_label(k)} {v['failed']} ({v['errors']})" for k, v in failed.items()),
        ]
    return [*out, ""]


def _http(results: dict[str, Any]) -> list[str]:
    rows = [r for r in results.get("http", []) if "events_per_s" in r]
    if not rows:
        return []
    apix = next((r for r in rows if r["target"] == "apix"), None)
    out = ["## 4. HTTP publish", ""]
    out.append(
        "32 concurrent keep-alive clients POST events (closed loop) to one channel with no "
        "subscribers: APIX `POST /api/v1/apix/channels/room:http/events` with a bearer token "
        "(authentication, permission check, Redis stream append + announce); the baselines a "
        "bare `POST /publish/{channel}`."
    )
    table = []
    for r in rows:
        lat = r["latency"]
        table.append(
            [
                _label(r["target"]),
                _fmt(r["events_per_s"], 0),
                _fmt(lat["p50_ms"], 2),
                _fmt(lat["p99_ms"], 2),
                _fmt(lat["p999_ms"], 2),
                _fmt(r["server_us_per_event"], 0),
                _fmt(r["total_us_per_event"], 0) if r["target"] == "apix" else "",
                _ratio(apix and apix["server_us_per_event"], r["server_us_per_event"]),
                _fmt(r["server_cores"], 2),
                _fmt(r["generator_cores"], 2),
            ]
        )
    header = [
        "server",
        "events/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "server CPU µs/event",
        "+ Redis/PG µs",
        "APIX ÷ this (CPU)",
        "server cores",
        "generator cores",
    ]
    out += ["", _table(header, table)]
    parts = apix.get("aux_us_per_event_parts") if apix else None
    if parts:
        names = {"redis": "Redis", "postgres": "PostgreSQL", "worker": "the archiver"}
        split = ", ".join(f"{names.get(k, k)} {_fmt(v, 1)}" for k, v in parts.items())
        out += ["", f"APIX's *+ Redis/PG* beyond the node, µs per event: {split}."]
    out += _rounds_note(rows, "events_per_s", "events/s", "Events/s", lambda r: _label(r["target"]))
    return [*out, ""]


def _rounds_note(
    rows: list[dict[str, Any]],
    figure: str,
    by: str,
    name: str,
    label: Callable[[dict[str, Any]], str],
) -> list[str]:
    """Under a table whose targets took turns: how its rows were chosen, and every round."""
    rounds = max((len(r.get("rounds", [])) for r in rows), default=0)
    if rounds <= 1:
        return []
    spread = [
        f"{label(r)}: " + " / ".join(_fmt(x.get(figure), 0) for x in r["rounds"])
        for r in rows
        if r.get("rounds")
    ]
    return [
        "",
        f"Each row is the median of up to {rounds} rounds by {by} (a failed round is listed, "
        "not counted); the targets took turns, round by round, so that drift in the machine's "
        f"speed weighs on all alike. {name}, round by round: " + "; ".join(spread) + ".",
    ]


def _two_nodes(results: dict[str, Any]) -> list[str]:
    series_list = [s for s in results.get("two_nodes", []) if "points" in s]
    if not series_list:
        return []
    cfg = results["config"]["two_nodes"]
    out = ["## 5. Two nodes", ""]
    out.append(
        f"APIX with {cfg['subscribers']:,} subscribers of one channel, on one node and then "
        "split evenly over two nodes (same Redis and PostgreSQL) with the publisher on the "
        "first: the cross-node path is Redis pub/sub to the second node's hub. CPU is both "
        "nodes together."
    )
    table = []
    one = next((s for s in series_list if s["nodes"] == 1), None)
    for s in series_list:
        for p in s["points"]:
            ref = _at_rate(one["points"], p["rate"]) if one else None
            lat = p["latency"]
            table.append(
                [
                    f"{s['nodes']} node{'s' if s['nodes'] > 1 else ''}",
                    f"{p['rate']:g}",
                    _fmt(p["deliveries_per_s"], 0) + (" (sat.)" if p["saturated"] else ""),
                    _fmt(lat["p50_ms"]),
                    _fmt(lat["p99_ms"]),
                    f"{p['lost']:,}",
                    _fmt(p["server_us_per_delivery"]),
                    _fmt(p["total_us_per_delivery"]),
                    _ratio(p["server_us_per_delivery"], ref and ref["server_us_per_delivery"]),
                    _fmt(p["server_cores"], 2),
                    f"{s.get('open', {}).get('ok', 0):,}",
                ]
            )
    header = [
        "APIX",
        "events/s",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "lost",
        "server CPU µs/delivery",
        "+ Redis/PG µs",
        "÷ one node (CPU)",
        "server cores",
        "subscribed",
    ]
    return [*out, "", _table(header, table), ""]


def _profile(results: dict[str, Any]) -> list[str]:
    prof = results.get("profile") or {}
    out = ["## Profile and hot spots", ""]
    names = {
        "fanout": "Fan-out at saturation",
        "publish": "Many channels (the per-event publish path)",
        "connect": "Connects + subscribes",
        "http": "HTTP publish",
    }
    for key, title in names.items():
        info = prof.get(key)
        if not info or not info.get("samples"):
            continue
        extra = ""
        if key == "publish" and info.get("point"):
            p = info["point"]
            extra = (
                f" ({info['connections']:,} connections over {info['channels']:,} channels, "
                f"{info['rate']} events/s offered; {p['server_us_per_delivery']} µs server CPU "
                "per delivery under the profiler)"
            )
        if key == "fanout" and info.get("point"):
            p = info["point"]
            extra = (
                f" ({info['subscribers']:,} subscribers, {info['rate']} events/s offered; "
                f"{p['deliveries_per_s']:,.0f} deliveries/s under the profiler)"
            )
        out += [f"### {title}{extra}", ""]
        if info.get("flamegraph"):
            out += [f"Flame graph: [`docs/{info['flamegraph']}`]({info['flamegraph']}).", ""]
        rows = []
        inclusive = info.get("inclusive_apix", info["inclusive"])[:12]
        selfs = info["self"][:12]
        lines = info["self_lines"][:12]
        for i in range(max(len(inclusive), len(selfs), len(lines))):
            row = []
            for col in (inclusive, selfs, lines):
                row += (
                    [f"`{col[i]['function']}`", f"{col[i]['share']:.1%}"]
                    if i < len(col)
                    else ["", ""]
                )
            rows.append(row)
        out.append(
            f"{info['samples']:,} samples (py-spy, 250 Hz, non-blocking, the gateway process)."
        )
        out += [
            "",
            _table(
                ["inclusive (APIX code)", "%", "self (function)", "%", "self (line)", "%"],
                rows,
            ),
            "",
        ]
    note = _note("hotspots.md")
    if note:
        out += [note, ""]
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
