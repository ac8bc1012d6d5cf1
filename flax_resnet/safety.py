"""What keeps a run's work safe besides its checkpoints: one run per workdir, stop signals
that end a run cleanly, and JSON files that stay valid whatever the numbers.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"


class WorkdirBusyError(Exception):
    """Another live run holds the workdir."""


class WorkdirLock:
    """An exclusive ``flock`` on ``workdir/.lock`` naming its holder (pid, host, start time).

    The kernel drops the lock of a process that dies, so a lock left by a killed run is
    taken over; ``took_over`` then names that run. A clean exit empties the file.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self.took_over: str | None = None
        self._file: Any = None

    def __enter__(self) -> WorkdirLock:
        f = open(self.path, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by another run ({holder}); wait for "
                "it to end, or use another workdir"
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            self.took_over = previous
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.close()  # releases the flock
            self._file = None


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop (``requested`` is the signal number); the
    loop saves a checkpoint and ends. A second signal ends the process at once. Only the
    main thread can install handlers: elsewhere the signals keep their default effect."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            os.write(2, b"second signal: exiting now, without saving\n")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, with a "
                    "checkpoint (send it again to exit now)\n".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as ``None`` (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
