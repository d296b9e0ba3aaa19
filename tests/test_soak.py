"""bench/soak.py as a test: two real sidecar processes under a mix of traffic and scheduled Redis faults
(lost replies, cuts, SCRIPT FLUSH, a sidecar SIGKILLed and restarted), then conservation and ledger =
Redis. It runs CREDITGATE_SOAK_MINUTES of load (0.5 by default; .ci/run sets 1; by hand 30).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINUTES = os.environ.get("CREDITGATE_SOAK_MINUTES", "0.5")


def _soak(database_server: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--database-url", database_server, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600 + float(MINUTES) * 60,
        check=False,
    )


def test_a_soak_with_faults_keeps_money_conserved_and_the_ledger_equal_to_redis(database_server: str) -> None:
    run = _soak(database_server, "--minutes", MINUTES)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "conservation: ok; ledger = Redis: ok" in out, out
    for fault in ("lost_replies", "cut", "script_flush", "kill_restart"):  # each fault came at least once
        [row] = [line for line in out.splitlines() if line.startswith(f"| {fault} |")]
        assert int(row.split("|")[2]) >= 1, out
    for kind in ("plain", "stream", "grant"):
        assert f"| {kind} | 200 |" in out, out
    assert "| cache | 200/hit |" in out, out


def test_the_soak_fails_when_redis_and_the_ledger_disagree(database_server: str) -> None:
    run = _soak(database_server, "--minutes", "0.05", "--corrupt")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "VIOLATIONS:" in run.stdout
    assert "drift balance: {'items': 1, 'microcredits': 1}" in run.stdout, run.stdout
