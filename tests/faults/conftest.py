"""The fault-injection suite's ledger: faults injected, outputs checked, files lost.

Every test of ``tests/faults`` records what it does through the ``faults`` fixture; at the
end of the session pytest prints one closing line (``python -m pytest tests/faults``)::

    fault injection: 6889 faults injected (bit flip 6389, truncation 434, ..., kill -9 of a
    stage 4, ...); 1264 outputs checked; 0 files lost or half-written

(``-v`` adds one line per kind of fault with what exactly was injected.)

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
    details: dict[str, Counter[str]] = field(default_factory=dict)
    checked: int = 0
    lost: list[str] = field(default_factory=list)

    def inject(self, kind: str, n: int = 1, *, detail: str | None = None) -> None:
        """Record ``n`` faults of ``kind`` (a bit flip, a kill -9, a full disk ...)."""
        self.injected[kind] += n
        if detail is not None:
            self.details.setdefault(kind, Counter())[detail] += n

    def check(self, ok: bool, what: str) -> bool:
        """Record one output check; a failed one is a lost file. Returns ``ok``."""
        self.checked += 1
        if not ok:
            self.lost.append(what)
        return ok

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.injected.most_common())
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
    if config.getoption("verbose") > 0:
        for kind, details in LEDGER.details.items():
            terminalreporter.write_line(
                f"  {kind}: " + ", ".join(f"{d} {n}" if n > 1 else d for d, n in details.items()))
    for what in LEDGER.lost[:20]:
        terminalreporter.write_line(f"  lost: {what}")
