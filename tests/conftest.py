"""Test set-up: without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module
imports `sage_fast.kernels`. The classifier cache goes to a temporary folder for the session, so
tests never write into the repository or the home folder, nor read a user's cache; so does
Hypothesis's example database.
"""
import atexit
import os
import shutil
import tempfile

import torch

os.environ["SAGE_FAST_CACHE"] = tempfile.mkdtemp(prefix="sage-fast-test-cache-")
atexit.register(shutil.rmtree, os.environ["SAGE_FAST_CACHE"], ignore_errors=True)
# Hypothesis keeps its example database in ./.hypothesis unless told otherwise: not in the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(os.environ["SAGE_FAST_CACHE"], "hypothesis"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (bf16 and GPU-only cases)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def fresh_self_checks(monkeypatch):
    """No kernel self-check has run (sage_fast.ops.selfcheck) and SAGE_FAST_SELF_CHECK is unset; the
    process's results and warnings come back after the test."""
    from sage_fast.ops import selfcheck

    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    monkeypatch.setattr(selfcheck, "_WARNED", set())
    monkeypatch.delenv(selfcheck.ENV_VAR, raising=False)


@pytest.fixture
def auto_takes_triton(monkeypatch):
    """backend "auto" treats every device as a kernel device (on CPU: the interpreter; on a GPU it
    already does), so that its self-check fallback runs on a machine without one."""
    from sage_fast.ops import backend

    monkeypatch.setattr(backend, "_auto_prefers_triton", lambda device: True)
