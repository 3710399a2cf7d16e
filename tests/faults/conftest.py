"""The fault-injection suite's ledger: faults injected, outputs checked, files lost.

Every test of ``tests/faults`` records what it does through the ``faults`` fixture; at the
end of the session pytest prints one closing line (``python -m pytest tests/faults``)::

    fault injection: 6583 faults injected (bit flip 6266, truncation 212, ...);
    1204 outputs checked; 0 files lost or half-written

"Lost" counts every check that found an output missing, half-written or different from
the uninterrupted run where it should have been intact; a test that records one also fails.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest


@dataclass
class FaultLedger:
    injected: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    lost: list[str] = field(default_factory=list)

    def inject(self, kind: str, n: int = 1) -> None:
        """Record ``n`` faults of ``kind`` (a bit flip, a kill -9, a full disk ...)."""
        self.injected[kind] += n

    def check(self, ok: bool, what: str) -> bool:
        """Record one output check; a failed one is a lost file. Returns ``ok``."""
        self.checked += 1
        if not ok:
            self.lost.append(what)
        return ok

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.injected.items()))
        return (f"fault injection: {sum(self.injected.values())} faults injected ({kinds}); "
                f"{self.checked} outputs checked; {len(self.lost)} files lost or half-written")


LEDGER = FaultLedger()


@pytest.fixture
def faults() -> FaultLedger:
    return LEDGER


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not LEDGER.injected and not LEDGER.checked:
        return
    terminalreporter.write_sep("=", "fault injection")
    terminalreporter.write_line(LEDGER.summary())
    for what in LEDGER.lost[:20]:
        terminalreporter.write_line(f"  lost: {what}")
