"""Stopping a run on SIGTERM / SIGUSR1 (SLURM, cloud preemption) at a step boundary, with a checkpoint.

`StopSignals` is the trainer's side: while `caught()` is active, a stop signal only sets a flag; the
trainer reads it after each step (all ranks agree on it in one all-reduce), writes a checkpoint and raises
`Preempted` (exit status 75: "try again"). Inside `interruptible()` (an evaluation or export that the last
checkpoint already covers) the signal raises at once instead.

Two helpers keep a job's other processes in line:

* DataLoader workers forked while signals are caught ignore SIGTERM / SIGUSR1 from anyone but their
  parent (`_after_fork_in_child`), so a signal sent to every process of the job does not kill the workers
  of a step the training process is still finishing.
* Under torchrun, `_StuckRankWatchdog` ends a rank that cannot reach the stop within `StopSignals.grace()`
  (a peer died and it is blocked in a collective) with 128 + the signal number, as the signal's default
  action would have.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import warnings
from typing import Callable, Optional

#: signals that ask a run to stop at the next step boundary with a checkpoint (SLURM, cloud preemption)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGUSR1 after a whole step, with a checkpoint written: resubmit with --resume."""

    #: EX_TEMPFAIL (sysexits.h): a temporary failure, try again
    exit_code = 75

    def __init__(self, message: str, step: int, agreed: bool = True):
        super().__init__(message)
        self.step = step
        #: every rank stopped after the same step and passed a barrier (False: one rank stopped during an
        #: evaluation, on its own: no collective may follow)
        self.agreed = agreed


def signal_name(signum) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """The stop-signal state of one training process.

    interrupt: builds the exception that `interruptible()` raises when a signal arrives inside it (the
    trainer's `Preempted` naming the step and the last checkpoint).
    """

    def __init__(self, distributed: bool, interrupt: Callable[[], BaseException]):
        self.distributed = distributed
        self._interrupt = interrupt
        #: the number of the first stop signal received while caught, else None
        self.signum: Optional[int] = None
        self._raises = False
        self._watchdog: Optional[_StuckRankWatchdog] = None
        #: the longest time between two step boundaries so far (seconds), for `grace`
        self.slowest_step = 0.0

    def step_took(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def grace(self) -> float:
        """Seconds a rank may take from a stop signal to the stop: the step under way and the all-reduce after it."""
        return max(5.0, 3.0 * self.slowest_step)

    def acknowledge(self) -> None:
        """Every rank reached the stop: none is stuck (the watchdog stands down)."""
        if self._watchdog is not None:
            self._watchdog.acknowledge()

    @contextlib.contextmanager
    def caught(self):
        """SIGTERM / SIGUSR1 only set `signum` (in the main thread; elsewhere a warning says they cannot be
        caught). DataLoader workers forked meanwhile ignore them unless their parent sends them."""
        global _catching_pid
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("fit() runs outside the main thread: SIGTERM / SIGUSR1 cannot be caught, a preempted run "
                          "loses the steps since its last checkpoint")
            yield
            return

        def handler(signum, frame):
            if self.signum is None:
                self.signum = signum
            if self._raises:
                raise self._interrupt()

        _register_fork_hook()
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        self._watchdog = _StuckRankWatchdog(self.grace) if self.distributed else None
        _catching_pid = os.getpid()
        try:
            yield
        finally:
            _catching_pid = None
            if self._watchdog is not None:
                self._watchdog.close()
                self._watchdog = None
            for s, h in previous.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def interruptible(self):
        """A block that only evaluates or exports what the newest checkpoint already holds: a stop signal ends
        it at once (the `interrupt` exception, not agreed between ranks), since a resume loses nothing but this
        block, and an evaluation can outlast the grace period before SIGKILL."""
        if self.signum is not None:
            raise self._interrupt()
        self._raises = True
        try:
            yield
        finally:
            self._raises = False


# the process inside `StopSignals.caught`, if any (a forked child sees its parent's pid here)
_catching_pid: Optional[int] = None
_fork_hook_registered = False


def _after_fork_in_child() -> None:
    """A child forked by a process that catches stop signals (a DataLoader worker) keeps running through
    SIGTERM / SIGUSR1 from anyone but its parent: the training process is finishing a step with the batches
    it serves, and stops it afterwards. Without this, a signal to every process of the job (SLURM) kills the
    workers, and torch's SIGCHLD handler then raises in the training process, in the middle of the step or
    checkpoint it is finishing. The parent's own SIGTERM (DataLoader shutdown, multiprocessing's exit) still
    ends it, as torch's worker handler would. The signals are blocked in the child, which has one thread
    here, so every later thread inherits the mask, and one thread takes them with sigwaitinfo."""
    global _catching_pid
    if _catching_pid is None or _catching_pid == os.getpid():
        return
    _catching_pid = None
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)  # the parent's socket: this child's signals are not the parent's
    if not hasattr(signal, "sigwaitinfo"):  # macOS: the workers keep torch's behaviour
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_filter_stop_signals, name="sage-fast-stop-filter", daemon=True).start()


def _filter_stop_signals() -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid == os.getppid():
            os._exit(0)  # exit 0, as torch's worker handler does, so no SIGCHLD handler reports a crash


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_registered = True


class _StuckRankWatchdog:
    """Under torchrun, ends a rank that a stop signal finds stuck, as the signal's default action would.

    Python runs signal handlers in the main thread between bytecodes, so a rank blocked in a collective
    whose peer died (NCCL waits without end) would sit out a SIGTERM until torchrun's SIGKILL 30 s later,
    where it used to die at once. The C-level handler also writes the signal number to a wake-up socket
    at once; this thread reads it and, unless the main thread reaches the stop (`acknowledge`) within
    `grace()` seconds, writes one line and exits with 128 + the signal number.
    """

    def __init__(self, grace: Callable[[], float]):
        self._grace = grace
        self._ack = threading.Event()
        self._closing = False
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="sage-fast-stop-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._read.recv(64)
            except OSError:
                return
            if self._closing or not data:
                return
            signum = next((b for b in data if b in STOP_SIGNALS), None)
            if signum is None:
                continue  # another signal with a Python handler (SIGINT) wakes the socket too
            grace = self._grace()
            if self._ack.wait(grace) or self._closing:
                return
            print(f"sage-fast: {signal_name(signum)}: this process did not reach the end of its step within "
                  f"{grace:.0f} s (a peer process is gone?); exiting without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)

    def acknowledge(self) -> None:
        self._ack.set()

    def close(self) -> None:
        self._closing = True
        self._ack.set()
        signal.set_wakeup_fd(self._old_fd)
        self._write.close()  # the reader sees the end of the stream
        self._thread.join(timeout=5)
        self._read.close()
