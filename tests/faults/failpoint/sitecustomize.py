"""A failpoint for the fault-injection suite: SIGKILL a stage process at its worst moment.

Put this directory first on PYTHONPATH and Python imports it at start-up in every process;
it acts only in the process whose ``sys.argv`` ends with the words of ``CCNF_FAULT_ARGV``
(e.g. ``stages/train.py --task t0``), so DVC and the other stages run untouched.

``CCNF_FAULT_MODE``:

* ``write``: the first ``Path.write_bytes``/``Path.write_text`` of the process writes half of
  its data, flushes it to disk, and the process kills itself with SIGKILL (``kill -9``:
  nothing of Python's clean-up runs);
* ``rename``: the process kills itself right before ``os.replace`` moves a finished
  temporary onto ``CCNF_FAULT_TARGET`` (every byte written, nothing published yet).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

_ARGV = os.environ.get("CCNF_FAULT_ARGV", "").split()
_MODE = os.environ.get("CCNF_FAULT_MODE", "")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    if _MODE == "write":
        real_bytes = Path.write_bytes

        def write_bytes(self: Path, data: bytes) -> int:
            if len(data) < 2:
                return real_bytes(self, data)
            with open(self, "wb") as fh:
                fh.write(bytes(data[: len(data) // 2]))
                fh.flush()
                os.fsync(fh.fileno())
            _die()
            return 0

        def write_text(self: Path, data: str, *args: object, **kwargs: object) -> int:
            return write_bytes(self, data.encode())

        Path.write_bytes = write_bytes  # type: ignore[method-assign]
        Path.write_text = write_text  # type: ignore[method-assign]
    elif _MODE == "rename":
        target = Path(os.environ["CCNF_FAULT_TARGET"]).resolve()
        real_replace = os.replace

        def replace(src: object, dst: object, *args: object, **kwargs: object) -> None:
            if Path(str(dst)).resolve() == target:
                _die()
            real_replace(src, dst, *args, **kwargs)

        os.replace = replace  # type: ignore[assignment]


if _ARGV and " ".join(getattr(sys, "argv", [])).endswith(" ".join(_ARGV)):
    _install()
