"""One writer per folder: a lock file that names its holder (process id, host, since when).

    with FolderLock("runs/sage"):      # FolderInUse when another process holds runs/sage
        ...                            # this process alone writes into runs/sage

The lock is ``FOLDER/.sage-fast.lock``, held with ``flock(2)`` on the open file: the kernel releases it when the
holder exits in any way (an exception, a signal, kill -9), so a lock can never outlive its process. The file
holds one JSON line, ``{"pid", "host", "since", "command"}``, written once the lock is taken, for the message
that refuses a second writer. A holder that ends normally deletes the file (and the folders it created, when
they are left empty); one that was killed leaves it behind, and the next process takes the lock over with a
warning naming the dead holder.

Across machines on a shared file system the lock is as good as the file system's ``flock``: on Linux NFS
(v3 with lockd, v4) it is mapped to a byte-range lock that the server enforces for every client; a mount with
``nolock`` or ``local_lock=flock`` (and Lustre without ``-o flock``) keeps it to one machine. Where the file
system refuses ``flock`` (ENOLCK, EOPNOTSUPP, ENOSYS), the lock falls back to creating the file exclusively
(``O_EXCL``, atomic on NFS v3 and later): a holder on this host is checked by its process id, one on
another host cannot be checked, and its file then has to be deleted by hand once that process is gone (the
message says so).

A process may take a lock it holds again (the count is kept per folder); forked children (DataLoader
workers) close their copy of the file, so only the holder's exit releases it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

#: the lock file in a locked folder
LOCK_NAME = ".sage-fast.lock"
#: flock errors that mean "this file system has no flock", not "someone holds it"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class FolderInUse(Exception):
    """Another process holds the folder's lock; `holder` is what its lock file says (possibly empty)."""

    user_error = True  # one line and exit status 2 on the command line (sage_fast.training.errors)

    def __init__(self, folder: Path, holder: dict, checked: bool = True):
        self.folder, self.holder, self.checked = Path(folder), holder, checked
        super().__init__(f"{folder} is in use by {describe_holder(holder)} (lock file {Path(folder) / LOCK_NAME})"
                         + ("" if checked else ": its process cannot be checked from this host; delete the lock "
                                               "file if that process is gone"))


def describe_holder(holder: dict) -> str:
    """``another process (pid 123 on host node1, since 2026-01-02 03:04:05 UTC, sage-fast train)``."""
    parts = []
    if holder.get("pid") is not None:
        parts.append(f"pid {holder['pid']}" + (f" on host {holder['host']}" if holder.get("host") else ""))
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    if holder.get("command"):
        parts.append(str(holder["command"]))
    return "another process" + (f" ({', '.join(parts)})" if parts else "")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _command() -> str:
    """The program and its first argument (``sage-fast train``; ``python -m pkg`` shows as ``pkg``)."""
    if not sys.argv or not sys.argv[0]:
        return ""
    program = Path(sys.argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name
    return " ".join([name] + sys.argv[1:2])[:200]


def _read_holder(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return {}
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {"unreadable": text[:100]}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return True  # someone else's process (or nonsense): do not take its lock
    return True


# the folders this process holds: resolved path -> [FolderLock, count]
_HELD: Dict[str, list] = {}
_fork_hook = False


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copy of each lock file: closing a duplicate releases
    nothing, and the lock then ends with the holder, not with the last of its workers."""
    for lock, _ in list(_HELD.values()):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


class FolderLock:
    """The lock of `folder` (created, with its parents, when missing); see the module docstring.

    enabled=False: a no-op (the processes of a distributed run other than rank 0). wait: seconds to wait for
    a holder to release it before `FolderInUse` (0: refuse at once).
    """

    def __init__(self, folder, enabled: bool = True, wait: float = 0.0):
        self.folder = Path(folder).expanduser()
        self.enabled = enabled
        self.wait = wait
        self._fd: Optional[int] = None
        self._created: List[Path] = []
        self._key: Optional[str] = None
        #: what the lock file said when this process took it over from a dead holder (else None)
        self.took_over: Optional[dict] = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    # -- taking and releasing ------------------------------------------------------------------
    def acquire(self) -> "FolderLock":
        if not self.enabled:
            return self
        global _fork_hook
        self._make_folder()
        self._key = str(self.folder.resolve())
        held = _HELD.get(self._key)
        if held is not None:  # this process holds it already (train() around Trainer.fit)
            held[1] += 1
            return self
        try:
            self._take()
        except BaseException:
            self._remove_created()
            raise
        _HELD[self._key] = [self, 1]
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_close_in_child)
            _fork_hook = True
        return self

    def release(self) -> None:
        if not self.enabled or self._key is None:
            return
        held = _HELD.get(self._key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[self._key]
        owner = held[0]
        if owner._fd is not None:
            # deleted while still held: a process waiting on the old file sees it gone and starts over
            with contextlib.suppress(OSError):
                os.unlink(owner.path)
            with contextlib.suppress(OSError):
                os.close(owner._fd)
            owner._fd = None
        owner._remove_created()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals -----------------------------------------------------------------------------
    def _make_folder(self) -> None:
        missing, p = [], self.folder
        while not p.exists() and p.parent != p:
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue  # made meanwhile by another process: not ours to remove
            self._created.append(p)

    def _remove_created(self) -> None:
        for p in reversed(self._created):  # the deepest first; only while empty
            with contextlib.suppress(OSError):
                p.rmdir()
        self._created = []

    def _take(self) -> None:
        # at least a moment: `lock_holder` of another process may hold a shared lock for a few microseconds
        deadline = time.monotonic() + max(self.wait, 0.2)
        for _ in range(100 + int(self.wait * 20)):  # starts over when a holder deleted the file under us, or waits
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue  # released meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in _NO_FLOCK and created:
                    self._fd = fd  # made exclusively: ours, as `_take_exclusive` would have it
                    self._write_holder({})
                    return
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    raise FolderInUse(self.folder, _read_holder(self.path)) from None
                if e.errno in _NO_FLOCK:
                    self._take_exclusive()
                    return
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            self._write_holder(_read_holder(self.path))
            return
        raise FolderInUse(self.folder, _read_holder(self.path))

    def _take_exclusive(self) -> None:
        """No flock here: create the lock file exclusively; a dead holder's on this host is replaced (an empty
        file, a holder that died before writing its line, after a minute)."""
        host = socket.gethostname()
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if not holder:
                    try:
                        age = time.time() - os.stat(self.path).st_mtime
                    except FileNotFoundError:
                        continue
                    if age < 60:
                        raise FolderInUse(self.folder, holder, checked=False) from None
                elif holder.get("host") != host:
                    raise FolderInUse(self.folder, holder, checked=False) from None
                elif holder.get("pid") is not None and _pid_alive(holder["pid"]):
                    raise FolderInUse(self.folder, holder) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # its process is gone
                self.took_over = holder
                continue
            self._fd = fd
            self._write_holder(self.took_over or {})
            return
        raise FolderInUse(self.folder, _read_holder(self.path))

    def _write_holder(self, previous: dict) -> None:
        if previous:
            # the file of a holder that did not release it: killed, or its machine went down
            self.took_over = previous
            warnings.warn(f"{self.folder}: taking over the lock of {describe_holder(previous)}, which ended "
                          "without releasing it")
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
                           "command": _command()}) + "\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, line.encode("utf-8"), 0)
        with contextlib.suppress(OSError):
            os.fsync(self._fd)


def lock_holder(folder) -> Optional[dict]:
    """What the lock file of `folder` says when another process holds the lock now, else None. Takes nothing
    and creates nothing (a shared lock, given back at once)."""
    path = Path(folder).expanduser() / LOCK_NAME
    key = str(Path(folder).expanduser().resolve())
    if key in _HELD or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return _read_holder(path)
        return None
    finally:
        os.close(fd)
    return None
