"""One writer per folder: the lock file, its holder's line, takeover of a dead holder's, the no-flock fallback."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from sage_fast.utils import folder_lock
from sage_fast.utils.folder_lock import LOCK_NAME, FolderInUse, FolderLock, lock_holder

# the module imports nothing of the package: load it by its path in the helper processes (no torch to start)
_PRELUDE = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("folder_lock", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
""")


def helper(body: str, folder) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _PRELUDE + textwrap.dedent(body), folder_lock.__file__,
                             str(folder)], stdout=subprocess.PIPE, text=True)


def test_the_lock_names_its_holder_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "a" / "b"
    with FolderLock(folder) as lock:
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["since"]
        with FolderLock(folder):  # the holder may take it again
            pass
        assert (folder / LOCK_NAME).exists()  # still held by the outer block
        assert lock.took_over is None
    assert not (tmp_path / "a").exists()  # the folders it made, empty again, are gone
    folder.mkdir(parents=True)
    (folder / "kept").write_text("x")
    with FolderLock(folder):
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["kept"]


def test_another_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    proc = helper("""
        mod.FolderLock(sys.argv[2]).acquire()
        print("held", flush=True)
        time.sleep(300)
    """, tmp_path)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=rf"in use by another process \(pid {proc.pid} on host "):
            FolderLock(tmp_path).acquire()
        assert lock_holder(tmp_path)["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists() and lock_holder(tmp_path) is None  # left behind, held by nobody
    with pytest.warns(UserWarning, match=rf"taking over the lock of another process \(pid {proc.pid} on host"):
        lock = FolderLock(tmp_path).acquire()
    assert lock.took_over["pid"] == proc.pid
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_forked_child_does_not_keep_the_lock_of_a_dead_holder(tmp_path):
    """A DataLoader worker outliving its killed parent for a while must not keep the folder locked."""
    proc = helper("""
        mod.FolderLock(sys.argv[2]).acquire()
        if os.fork() == 0:
            print(os.getpid(), flush=True)  # after the fork hooks ran
            time.sleep(300)
            os._exit(0)
        os._exit(0)  # dies holding the lock, without releasing it
    """, tmp_path)
    child = int(proc.stdout.readline())
    proc.wait()
    try:
        os.kill(child, 0)  # still alive
        with pytest.warns(UserWarning, match="taking over"):
            FolderLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_without_flock_the_lock_file_is_created_exclusively(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    host = socket.gethostname()
    with FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host}))  # alive, on this host
    with pytest.raises(FolderInUse, match=rf"pid {os.getppid()} on host"):
        FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2 ** 22 + 7, "host": host}))  # no such process
    with pytest.warns(UserWarning, match=r"pid 4194311"):
        FolderLock(tmp_path).acquire().release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(FolderInUse, match="cannot be checked from this host") as e:
        FolderLock(tmp_path).acquire()
    assert e.value.checked is False
