"""The bench's output: a table per mode, the summary with the targets, bench.json and
bench.png (latency CDF per mode, throughput over time)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from charging import codec
from charging.tools.bench.result import ModeResult

TARGETS = {"drain_vs_ceiling": 0.7, "commands_per_charge": 5, "baseline_cpu_ratio": 2.0, "lots_cpu_ratio": 1.3,
           "bytes_held": 200,
           "steady_rate": 60_000, "steady_p99_ms": 10.0, "steady_p999_ms": 2.0, "authorize_p99_ms": 2.0,
           "worker_rss_mb": 80.0}
PROBLEMS = ("missing", "double_charged", "entries_settled_twice", "replay_mismatches", "money_mismatches",
            "negative_balances", "held_mismatches", "negative_available", "overcommitted",
            "lot_mismatches", "breakage_mismatches", "pending")  # what the checker counts against a clean mode
CAPACITY_EXAMPLES = [(1_000, 86_400), (10_000, 86_400), (60_000, 3_600)]  # (charges/s, dedupe window s)


def verdict(result: ModeResult, short: bool = False) -> str:
    c = result.check
    if "over_approved" in c:
        if short:
            return f"{c['over_approved']} over-approved" + ("" if result.ok else " INCONSISTENT")
        return (f"{c['over_approved']} over-approved, {c['negative_balances']} accounts below zero "
                f"(overdraft {c['overdraft']}); counts {'consistent' if result.ok else 'INCONSISTENT'}")
    if short:
        return "OK" if result.ok else "FAILED"
    problems = [f"{c[k]} {k.replace('_', ' ')}" for k in PROBLEMS if isinstance(c.get(k), int) and c[k]]
    retries = f", {c['cas_retries']} cas retries" if "cas_retries" in c else ""
    return ("OK" if result.ok else "FAILED" + (": " + ", ".join(problems) if problems else "")) + retries


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def mode_table(result: ModeResult) -> Table:
    table = Table(title=f"{result.mode}", show_header=False, title_justify="left")
    if result.seconds:
        table.add_row("throughput", f"{result.rate:,.0f} charges/s ({result.charges:,} in {result.seconds:.2f} s)")
    if latency := result.latency():
        table.add_row("latency p50/p95/p99/max", " / ".join(_ms(latency[k]) for k in ("p50", "p95", "p99", "max"))
                      + " ms")
    for key, value in result.check.items():
        if key not in ("ok", "consistent") and value not in ({}, None):
            table.add_row(f"check: {key.replace('_', ' ')}", str(value))
    for key, value in result.extra.items():
        if value not in (None, [], {}) and key != "first_errors":
            table.add_row(key.replace("_", " "), str(value))
    table.add_row("verdict", verdict(result))
    for note in result.notes:
        table.add_row("note", note)
    return table


def summary_table(results: list[ModeResult]) -> Table:
    table = Table("mode", "charges", "s", "charges/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "Redis cmds",
                  "Redis us", "bytes", "checker", title="charging bench (Redis cmds, us and bytes: per charge)")
    for r in results:
        if r.mode == "memory":
            continue
        lat = r.latency() or {}
        cost = r.extra.get("per_charge") or {}
        table.add_row(r.mode, f"{r.charges:,}", f"{r.seconds:.2f}", f"{r.rate:,.0f}", _ms(lat.get("p50")),
                      _ms(lat.get("p95")), _ms(lat.get("p99")), _ms(lat.get("max")),
                      *(_number(cost.get(k)) for k in ("redis_commands", "redis_cpu_us", "bytes_held")),
                      verdict(r, short=True))
    return table


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def targets(results: list[ModeResult]) -> list[dict]:
    by = {r.mode: r for r in results}
    rows = []

    def add(name: str, measured: float | None, goal: str, met: bool | None):
        rows.append({"target": name, "goal": goal, "measured": None if measured is None else round(measured, 3),
                     "met": met})

    if "drain" in by and "ceiling" in by and by["ceiling"].rate:
        ratio = by["drain"].rate / by["ceiling"].rate
        add("drain rate / ceiling", ratio, f">= {TARGETS['drain_vs_ceiling']}", ratio >= TARGETS["drain_vs_ceiling"])
    steady = [r for r in results if r.mode.startswith("steady")]
    if steady:
        best = max(r.rate for r in steady)
        add("steady charges/s", best, f">= {TARGETS['steady_rate']:,}", best >= TARGETS["steady_rate"])
    for r in steady:
        p99 = (r.latency() or {}).get("p99")
        add(f"steady p99 ms, {r.extra['offered_rate_per_s']:,}/s offered", p99, f"< {TARGETS['steady_p99_ms']}",
            None if p99 is None else p99 < TARGETS["steady_p99_ms"])
        if r.extra["offered_rate_per_s"] <= 10_000:
            p999 = (r.latency() or {}).get("p99.9")
            add(f"steady p99.9 ms, {r.extra['offered_rate_per_s']:,}/s offered", p999,
                f"<= {TARGETS['steady_p999_ms']}", None if p999 is None else p999 <= TARGETS["steady_p999_ms"])
    for r in results:
        if r.mode.startswith("authorize"):
            p99 = (r.latency() or {}).get("p99")
            load = f"{r.extra['offered_rate_per_s']:,}/s" if r.extra["offered_rate_per_s"] else "closed loop"
            add(f"authorize p99 ms, {r.extra['clients']} clients, {load}", p99, f"< {TARGETS['authorize_p99_ms']}",
                None if p99 is None else p99 < TARGETS["authorize_p99_ms"])
    if "drain" in by and (cost := by["drain"].extra.get("per_charge")):
        limit = TARGETS["commands_per_charge"]
        add("Redis commands per charge, drain", cost["redis_commands"], f"<= {limit}", cost["redis_commands"] <= limit)
    if "baseline" in by and (ratio := by["baseline"].extra.get("baseline_cpu_ratio")):
        add("Redis CPU per charge, baseline / today", ratio, f">= {TARGETS['baseline_cpu_ratio']}",
            ratio >= TARGETS["baseline_cpu_ratio"])
    if "lots" in by and (ratio := by["lots"].extra.get("lots_cpu_ratio")):
        add("Redis CPU per charge, 5 lots / plain", ratio, f"<= {TARGETS['lots_cpu_ratio']}",
            ratio <= TARGETS["lots_cpu_ratio"])
    if "memory" in by:
        held = by["memory"].extra["per_charge"]["bytes_held"]
        add("bytes held per charge for the dedupe window (its record)", held, f"<= {TARGETS['bytes_held']}",
            held <= TARGETS["bytes_held"])
    rss = [r.extra["worker_peak_rss_mb"] for r in results if r.extra.get("worker_peak_rss_mb")]
    if rss:
        add("worker peak RSS MB", max(rss), f"< {TARGETS['worker_rss_mb']}", max(rss) < TARGETS["worker_rss_mb"])
    return rows


def targets_table(rows: list[dict]) -> Table:
    table = Table("target", "goal", "measured", "met", title="targets (measured, not asserted)")
    for row in rows:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[row["met"]]
        table.add_row(row["target"], row["goal"], "-" if row["measured"] is None else f"{row['measured']:,}", met)
    return table


def capacity_bytes(per_charge: dict[str, int], rate: int, window_s: int, results_maxlen: int) -> int:
    """Redis memory at a steady rate, at its peak: a dedupe record per charge for the window
    and, until its bucket expires, up to one slice more (codec.dedupe_slice); result entries
    up to the results stream's cap; request entries are trimmed once acked."""
    kept_s = window_s + codec.dedupe_slice(window_s * 1000) / 1000
    charges = rate * window_s
    return (round(rate * kept_s * per_charge["dedupe_record"])
            + min(charges, results_maxlen) * per_charge["result_entry"])


def memory_table(per_charge: dict[str, int], results_maxlen: int) -> Table:
    table = Table("", "bytes", title="Redis memory per charge", show_header=False)
    for key, value in per_charge.items():
        table.add_row(key.replace("_", " "), f"{value:,}")
    for rate, window in CAPACITY_EXAMPLES:
        gb = capacity_bytes(per_charge, rate, window, results_maxlen) / 1e9
        table.add_row(f"{rate:,}/s, {window // 3600} h dedupe window", f"~{gb:,.1f} GB")
    return table


def write_json(path: Path, meta: dict, results: list[ModeResult], target_rows: list[dict]) -> None:
    path.write_text(json.dumps({**meta, "modes": [r.as_dict() for r in results], "targets": target_rows},
                               indent=2, default=str))


def write_plot(path: Path, results: list[ModeResult], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (cdf_ax, rate_ax) = plt.subplots(1, 2, figsize=(14, 5.5))
    for index, r in enumerate(results):
        color = f"C{index % 10}"  # one colour per mode in both plots
        if points := r.cdf():
            cdf_ax.plot([max(ms, 0.01) for ms, _ in points], [q for _, q in points], label=r.mode, color=color)
        if timeline := r.timeline():
            rate_ax.plot([t for t, _ in timeline], [v for _, v in timeline], label=r.mode, color=color)
        elif r.mode == "ceiling" and r.rate:
            rate_ax.axhline(r.rate, linestyle="--", color="grey", label=f"ceiling ({r.rate:,.0f}/s)")
    cdf_ax.set(xscale="log", xlabel="latency (ms, log scale)", ylabel="share of charges",
               title="latency CDF (steady: submit -> result, whole ms; client modes: per call)")
    rate_ax.set(xlabel="seconds since the mode started", ylabel="charges/s", title="throughput over time")
    for ax in (cdf_ax, rate_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
