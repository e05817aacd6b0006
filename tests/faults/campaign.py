"""The campaign's tally: trials, checks and violations per fault family, for the whole session.

Every test of tests/faults adds its trials here (``TALLY.family("kill -9").trial(...)``); the
conftest prints the table at the end of the session and writes it as JSON to
``var/faults/last-run.json`` (docs/RELIABILITY.md records a full run's figures).

The sizes come from the environment, so ``make test`` runs a CI-sized campaign and ``make
faults`` the full one:

* ``FAULT_TRIALS``: kill -9 trials (default 10; the full campaign: 100);
* ``FAULT_RPC_OUTAGE_S``: seconds the RPC is down (default 10; the full campaign: 60);
* ``FAULT_SEED``: the seed of the random moments (default: a new one, printed; set it to replay).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.invariants import Checks, Violation

REPO = Path(__file__).resolve().parents[2]
LAST_RUN = REPO / "var" / "faults" / "last-run.json"

FAMILIES = ("kill -9", "rpc outage", "engine death", "disk full", "clock jump", "claim order")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


TRIALS = env_int("FAULT_TRIALS", 10)
RPC_OUTAGE_S = env_int("FAULT_RPC_OUTAGE_S", 10)
SEED = env_int("FAULT_SEED", random.SystemRandom().randrange(1, 2**31))


@dataclass
class Family:
    name: str
    trials: int = 0
    checks: int = 0
    violations: list[Violation] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Figures worth printing that are not violations (e.g. answers billed but not delivered).
    counters: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    _identities: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def peak(self, name: str, value: float) -> None:
        """The largest ``value`` seen under ``name`` (e.g. tokens a cut stream lost)."""
        self.peaks[name] = max(value, self.peaks.get(name, value))

    def trial(self, checks: Checks, trials: int = 1) -> list[Violation]:
        """One trial (or ``trials``) and its invariant checks; returns the violations found."""
        found = []
        for v in checks.violations:  # one found again by a later check is counted once
            if v.identity not in self._identities:
                self._identities.add(v.identity)
                found.append(v)
        self.trials += trials
        self.checks += checks.count
        self.violations.extend(found)
        for name, value in checks.peaks.items():
            self.peak(name, value)
        return found

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


@dataclass
class Tally:
    started: float = field(default_factory=time.time)
    families: dict[str, Family] = field(default_factory=dict)

    def family(self, name: str) -> Family:
        if name not in self.families:
            self.families[name] = Family(name)
        return self.families[name]

    @property
    def empty(self) -> bool:
        return not self.families

    def rows(self) -> list[Family]:
        order = {name: i for i, name in enumerate(FAMILIES)}
        return sorted(self.families.values(), key=lambda f: order.get(f.name, len(order)))

    def table(self) -> str:
        lines = [
            f"fault campaign: seed {SEED}, FAULT_TRIALS={TRIALS}, "
            f"FAULT_RPC_OUTAGE_S={RPC_OUTAGE_S}",
            "",
            f"{'family':<14} {'trials':>6} {'checks':>7} {'violations':>10} {'seconds':>8}",
            f"{'-' * 14} {'-' * 6} {'-' * 7} {'-' * 10} {'-' * 8}",
        ]
        total = Family("total")
        for fam in self.rows():
            lines.append(
                f"{fam.name:<14} {fam.trials:>6} {fam.checks:>7} {len(fam.violations):>10} "
                f"{fam.seconds:>8.0f}"
            )
            total.trials += fam.trials
            total.checks += fam.checks
            total.violations.extend(fam.violations)
            total.seconds += fam.seconds
        lines.append(f"{'-' * 14} {'-' * 6} {'-' * 7} {'-' * 10} {'-' * 8}")
        lines.append(
            f"{'total':<14} {total.trials:>6} {total.checks:>7} {len(total.violations):>10} "
            f"{total.seconds:>8.0f}"
        )
        for fam in self.rows():
            if fam.counters or fam.peaks:
                shown = [f"{k} {v}" for k, v in sorted(fam.counters.items())]
                shown += [f"{k} {v:g}" for k, v in sorted(fam.peaks.items())]
                lines.append(f"{fam.name}: {', '.join(shown)}")
        by_name: dict[tuple[str, str], int] = {}
        for fam in self.rows():
            for v in fam.violations:
                by_name[(fam.name, v.name)] = by_name.get((fam.name, v.name), 0) + 1
        if by_name:
            lines.append("")
            lines.append("violations by invariant:")
            for (fam_name, name), n in sorted(by_name.items()):
                first = next(v for v in self.families[fam_name].violations if v.name == name)
                lines.append(f"  {fam_name:<13} {name:<24} {n:>4}  e.g. {first.detail[:150]}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "seed": SEED,
            "fault_trials": TRIALS,
            "rpc_outage_s": RPC_OUTAGE_S,
            "started": self.started,
            "finished": time.time(),
            "families": [
                {
                    "family": fam.name,
                    "trials": fam.trials,
                    "checks": fam.checks,
                    "violations": len(fam.violations),
                    "seconds": round(fam.seconds, 1),
                    "counters": fam.counters,
                    "peaks": fam.peaks,
                    "notes": fam.notes,
                    "violation_list": [
                        {"name": v.name, "detail": v.detail} for v in fam.violations[:200]
                    ],
                }
                for fam in self.rows()
            ],
        }

    def write(self, path: Path = LAST_RUN) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


TALLY = Tally()
