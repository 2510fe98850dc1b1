"""`charging chaos --quick`: workers killed and stalled, Redis killed and restarted, bad
entries fed in, all under load; afterwards nothing is lost, nothing charged twice. And the
parts the run stands on: a replayable fault plan, a catalogue of bad entries that each get
the dead-letter reason they must get."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from charging import codec
from charging.app.accounts import all_balances
from charging.app.audit import audit_deadletters
from charging.connection import connect
from charging.tools.chaos import hostile
from charging.tools.chaos.faults import KINDS, LONG_OUTAGE_S, REDIS_KILL, WORKER_KILL, WORKER_STALL, plan
from charging.tools.chaos.lots import FIRST_EXPIRY_S, OUTLIVES_MS, PLANS, plan_lots
from charging.tools.chaos.profile import FULL, QUICK
from tests.conftest import CHARGING, drain

REDIS_PY_RETRIES_S = 9.1  # connection.py: 8 attempts, jittered backoff capped at 2 s, summed at the caps


@pytest.mark.slow
def test_quick_chaos_run_loses_nothing_and_charges_nothing_twice(tmp_path):
    run = subprocess.run([CHARGING, "chaos", "--quick", "--seed", "3", "--out", str(tmp_path)],
                         env=os.environ, capture_output=True, text=True, timeout=600)

    report = json.loads((tmp_path / "chaos-report.json").read_text())
    assert run.returncode == 0, report["violations"] or run.stderr
    assert (report["verdict"], report["violations"]) == ("pass", [])
    results, load, injected = report["results"], report["load"], report["faults"]["injected"]
    assert (results["lost"], results["double_charged"], results["entries_settled_twice"],
            results["money_mismatches"], results["negative"], results["pending"]) == (0, 0, 0, 0, 0, 0)
    assert results["dead_lettered"] == results["bad_entries"] >= len(hostile.KINDS)
    assert (results["lot_mismatches"], results["breakage_mismatches"]) == (0, 0), "every lot and its breakage exact"
    assert load["lots"] > 0 and load["lots_expiring_during_load"] > 0 and load["accounts_on_plans"] > 0
    assert results["audit"]["lot_draws"] > 0 and results["audit"]["breakage_events"] > 0
    assert load["confirmed_charges"] == QUICK.charges
    assert load["sessions"] == QUICK.sessions and load["session_steps"] >= 3 * QUICK.sessions
    audit = results["audit"]
    assert (audit["held_mismatches"], audit["negative_available"], audit["overcommitted"]) == (0, 0, 0)
    assert load["unconfirmed_submits"] > 0, "a Redis outage outlasted the client retries: producers resubmitted"
    assert injected == {WORKER_KILL: QUICK.worker_kills, WORKER_STALL: QUICK.worker_stalls,
                        REDIS_KILL: QUICK.redis_kills}
    stalls = [f for f in report["faults"]["done"] if f["kind"] == WORKER_STALL]
    assert any(f["held"] for f in stalls), "a worker was stopped holding entries"
    assert report["worker_log_events"]["entries_reclaimed"] > 0, "and another consumer reclaimed what it held"
    assert "PASS" in run.stdout


@pytest.mark.parametrize("profile", [QUICK, FULL], ids=["quick", "full"])
def test_fault_plan_is_replayable_from_its_seed_and_keeps_a_worker_free(profile):
    faults = plan(profile, seed=5, reclaim_idle_s=1.0)

    assert faults == plan(profile, seed=5, reclaim_idle_s=1.0)
    assert faults != plan(profile, seed=6, reclaim_idle_s=1.0)
    counts = {kind: sum(1 for f in faults if f.kind == kind) for kind in KINDS}
    assert counts == {WORKER_KILL: profile.worker_kills, WORKER_STALL: profile.worker_stalls,
                      REDIS_KILL: profile.redis_kills}
    assert all(f.length_s > 1.0 for f in faults if f.kind == WORKER_STALL)
    outages = [f.length_s for f in faults if f.kind == REDIS_KILL]
    assert max(outages) > REDIS_PY_RETRIES_S >= min(outages), "one outage clients ride out, one they see"
    assert LONG_OUTAGE_S[0] > REDIS_PY_RETRIES_S
    on_workers = [f for f in faults if f.worker is not None]
    for fault in on_workers:  # one fault per worker at a time, and never all workers at once
        active = [f for f in on_workers if f.at_s <= fault.at_s < f.until_s]
        assert len({f.worker for f in active}) == len(active) < profile.workers

def test_lots_of_a_chaos_run_expire_while_the_load_runs_and_replay_from_the_seed():
    accounts = [f"account{i}" for i in range(1, QUICK.accounts + 1)]
    started = plan_lots(QUICK, 5, accounts)

    assert started == plan_lots(QUICK, 5, accounts)
    expiring = [g.expires_in_ms for g in started.grants if g.expires_in_ms and g.expires_in_ms < OUTLIVES_MS]
    assert expiring and all(FIRST_EXPIRY_S * 1000 <= ms <= QUICK.duration_s * 1000 for ms in expiring)
    assert set(started.plans.values()) == set(PLANS)


def test_every_kind_of_bad_entry_is_dead_lettered_with_its_reason_and_charges_nothing(settings):
    settings = settings.model_copy(update={"partitions": 2})  # so an entry can sit in the wrong partition
    client = connect(settings)
    accounts = [f"acct{i}" for i in range(10)]
    codec.set_balances(client, settings, [(a, 100) for a in accounts])
    expected = {hostile.write(client, settings, kind, f"bad-{i}", accounts[i % len(accounts)]): kind.reason
                for i, kind in enumerate(hostile.KINDS)}

    drain(settings)

    report = audit_deadletters(client, settings, expected)
    assert report.ok, report
    assert (report.found, report.others) == (len(hostile.KINDS), 0)
    assert len({kind.name for kind in hostile.KINDS}) == len(hostile.KINDS) >= 20
    assert dict(all_balances(client, settings)) == {a: 100 for a in accounts}
