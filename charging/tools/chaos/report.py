"""The chaos run's report: gathered into one dict, written as JSON, printed as a table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from charging.tools.chaos import hostile
from charging.tools.chaos.check import Verdict
from charging.tools.chaos.faults import KINDS, Fault
from charging.tools.chaos.load import Record
from charging.tools.chaos.profile import Profile

console = Console()


def announce(profile: Profile, seed: int, fsync: str, out: Path) -> None:
    console.print(f"chaos run: profile {profile.name}, seed {seed}, appendfsync {fsync}; {profile.charges:,} charges "
                  f"over about {profile.duration_s:.0f}s; logs and report in {out}", highlight=False)


def facts(profile: Profile, seed: int, fsync: str, settings: dict, records: list[Record], lots: dict, faults: list[Fault],
          done: list[dict], events: dict[str, int], exits: list[dict], verdict: Verdict, memory: dict,
          elapsed: dict[str, float]) -> dict:
    errors: Counter = sum((Counter(r.errors) for r in records), Counter())
    return {
        "verdict": "pass" if verdict.ok else "fail",
        "violations": verdict.violations,
        "seed": seed, "fsync": fsync, "profile": profile.as_dict(), "settings": settings,
        "load": {
            "confirmed_charges": sum(len(r.confirmed) for r in records),
            "replays_same_content": sum(r.replays for r in records),
            "replays_other_content": sum(len(r.conflicts) for r in records),
            "sessions": sum(sum(1 for rid in r.session_steps if "." not in rid) for r in records),
            "session_steps": sum(len(r.session_steps) for r in records),
            "bad_entries": verdict.numbers["bad_entries"],
            "bad_entry_kinds": len(hostile.KINDS),
            "unconfirmed_submits": sum(r.unconfirmed for r in records),
            "requests_resubmitted": sum(r.resubmitted for r in records),
            "never_confirmed": sum(len(r.never_confirmed) for r in records),
            "producer_errors": dict(errors),
            **lots,
        },
        "faults": {
            "injected": {kind: sum(1 for f in done if f["kind"] == kind) for kind in KINDS},
            "planned": [asdict(f) for f in faults],
            "done": done,
            "worker_exits_on_their_own": exits,
        },
        "worker_log_events": events,
        "results": verdict.numbers,
        "redis": {"used_memory": memory["used_memory"], "used_memory_human": memory["used_memory_human"]},
        "elapsed_s": {k: round(v, 1) for k, v in elapsed.items()},
    }


def save(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))


def show(report: dict) -> None:
    table = Table("", "", title=f"charging chaos: {report['profile']['name']}, seed {report['seed']}, "
                                f"appendfsync {report['fsync']}", show_header=False)
    for name, value in _load_rows(report) + _fault_rows(report) + _result_rows(report):
        table.add_row(name, value)
    table.add_row("verdict", "[green]PASS[/]" if report["verdict"] == "pass" else "[red]FAIL[/]")
    console.print(table)
    for violation in report["violations"]:
        console.print(f"[red]violation:[/] {violation}", highlight=False)


def _load_rows(report: dict) -> list[tuple[str, str]]:
    load = report["load"]
    return [
        ("load", f"{load['confirmed_charges']:,} confirmed charges, {load['replays_same_content']} replays "
                 f"(same content), {load['replays_other_content']} replays (other content), "
                 f"{load['sessions']} voice sessions ({load['session_steps']} steps: reserve, extends, commit), "
                 f"{load['bad_entries']} bad entries of {load['bad_entry_kinds']} kinds"),
        ("lots and plans", f"{load['lots']} credit lots granted to {load['accounts_with_lots']} accounts before the "
                           f"load ({load['lots_expiring_during_load']} expiring during it), "
                           f"{load['accounts_on_plans']} accounts on plans"),
        ("producers", f"{load['unconfirmed_submits']} submits unconfirmed, {load['requests_resubmitted']:,} "
                      f"requests resubmitted with the same ids, {load['never_confirmed']} never confirmed"),
    ]


def _fault_rows(report: dict) -> list[tuple[str, str]]:
    injected, done = report["faults"]["injected"], report["faults"]["done"]
    stalls = [f"{f['lasted_s']:.1f}s holding {f['held']}" for f in done if f["kind"] == "worker_stall"]
    outages = [f"{f['lasted_s']:.1f}s" + (" in an AOF rewrite" if f["rewrite_lead_s"] is not None else "")
               for f in done if f["kind"] == "redis_kill"]
    return [
        ("faults: worker SIGKILL", f"{injected['worker_kill']} (replaced under the same consumer name)"),
        ("faults: worker SIGSTOP", f"{injected['worker_stall']} ({', '.join(stalls) or '-'} entries; reclaim "
                                   f"idle {report['settings']['reclaim_idle_ms'] / 1000:g}s)"),
        ("faults: redis SIGKILL", f"{injected['redis_kill']} (down, then restarted from the AOF: "
                                  f"{', '.join(outages) or '-'})"),
        ("entries reclaimed from idle consumers", str(report["worker_log_events"]["entries_reclaimed"])),
        ("worker log", ", ".join(f"{k} {v}" for k, v in report["worker_log_events"].items())),
    ]


def _result_rows(report: dict) -> list[tuple[str, str]]:
    results = report["results"]
    audit = results["audit"]
    return [
        ("outcomes", f"{audit['outcomes']:,}: approved {audit['approved']:,}, rejected "
                     f"{sum(audit['rejected'].values()):,} {audit['rejected']}, duplicates {audit['duplicates']:,} "
                     f"(request ids answered idempotency_conflict: {audit['idempotency_conflicts']})"),
        ("replays answered other than the stored outcome", str(audit["replay_mismatches"])),
        ("lost", str(results["lost"]) + _lost_note(report)),
        ("double-charged", str(results["double_charged"])),
        ("entries settled twice", str(results["entries_settled_twice"])),
        ("money: sum(approved) != start - end", f"{results['money_mismatches']} accounts"),
        ("negative balances", str(results["negative"])),
        ("lots: granted != spent + breakage + left", f"{results['lot_mismatches']} of {audit['lots']} lots "
                                                     f"({audit['lot_draws']:,} outcomes drew from lots)"),
        ("breakage: events != the wallet's", f"{results['breakage_mismatches']} accounts "
                                             f"({audit['breakage_events']} breakage events)"),
        ("held funds", f"{audit['held']:,} held by {audit['open_reservations']} open reservations; "
                       f"{audit['held_mismatches']} accounts held != open reservations, "
                       f"{audit['negative_available']} available < 0, {audit['overcommitted']} commits over reserved"),
        ("dead-lettered", f"{results['dead_lettered']} of {results['bad_entries']} (right reason, once)"),
        ("pending", str(results["pending"])),
        ("redis memory at the end", report["redis"]["used_memory_human"]),
        ("time", f"load {report['elapsed_s']['load_s']}s, settle {report['elapsed_s']['settle_s']}s"),
    ]


def _lost_note(report: dict) -> str:
    results = report["results"]
    if report["fsync"] == "always":
        return ""
    kills = report["faults"]["injected"]["redis_kill"]
    return (f" (measured loss with everysec: {results['lost_charges']} charges, {results['lost_bad_entries']} "
            f"bad entries over {kills} Redis kills)")
