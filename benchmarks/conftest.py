"""pytest set-up of the benchmarks: options, session fixtures, and the summary written at the end.

A plain `python -m pytest` writes nothing into the repository: without --sage-results-dir the
results go to a new folder under the system's temporary directory (its path is printed at the end),
and Hypothesis (used by tests/) keeps its folder there too instead of ./.hypothesis (see
`pytest_configure`; this conftest is loaded by every run that includes benchmarks/, the default
test command among them). pytest-benchmark only writes ./.benchmarks when asked to
(--benchmark-save / --benchmark-autosave).

Options (all optional):
  --sage-results-dir DIR   where records.jsonl, summary.md, chart.png, env.json go
                           (default: a new folder under the system temp dir, one per session)
  --sage-append            keep the records already in DIR (run_gpu.sh runs several pytest sessions)
                           and reuse DIR/ceilings.json when it was measured on this device; needs
                           --sage-results-dir
  --sage-compile / --sage-no-compile
                           include the torch.compile baseline (default: on with CUDA, off on CPU)
  --sage-e2e-classes C     classes of the train-step benchmark (default 1000 on GPU, 10 on CPU)
  --sage-e2e-batch B       batch of the train-step benchmark (default 128 on GPU, 4 on CPU)
  --sage-cpu-threads N     torch threads on a CPU-only machine (default 1, for repeatable smoke numbers)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from . import environment, records, report
from .ceilings import load_or_measure_ceilings
from .timing import ON_GPU


def pytest_addoption(parser):
    group = parser.getgroup("sage-fast benchmarks")
    group.addoption("--sage-results-dir", default=None,
                    help="folder for records.jsonl, summary.md, chart.png and env.json "
                         "(default: a new folder under the system temp dir)")
    group.addoption("--sage-append", action="store_true", default=False,
                    help="add to the records already in --sage-results-dir instead of starting afresh, and "
                         "reuse its ceilings.json when it was measured on this device")
    group.addoption("--sage-compile", dest="sage_compile", action="store_true", default=None,
                    help="include torch.compile baselines (default: on with CUDA, off on CPU)")
    group.addoption("--sage-no-compile", dest="sage_compile", action="store_false",
                    help="skip torch.compile baselines")
    group.addoption("--sage-e2e-classes", type=int, default=None,
                    help="number of classes in the train-step benchmark (default 1000 on GPU, 10 on CPU)")
    group.addoption("--sage-e2e-batch", type=int, default=None,
                    help="batch size of the train-step benchmark (default 128 on GPU, 4 on CPU)")
    group.addoption("--sage-cpu-threads", type=int, default=1,
                    help="torch CPU threads during the benchmarks on a CPU-only machine (default 1)")
    group.addoption("--sage-priority", action="store_true", default=False,
                    help="run the selected cases most useful first (run_gpu.sh's torch.compile stages, which a "
                         "time limit may cut): fwd+bwd before fwd, bf16 before fp32, r = 32, 256, 4, 8; loss "
                         "C = 8142 first; train FIT on first")


class _SageSession:
    """Per-session state: the recorder (and the default temporary results folder) is created on first
    use, so that runs that select no benchmark (e.g. `pytest tests/`) create no folder."""

    def __init__(self, config):
        self.config = config
        given = config.getoption("--sage-results-dir")
        self.results_dir = Path(given) if given else None
        self.append = bool(config.getoption("--sage-append"))
        self._recorder = None
        self.ceilings = None
        self.skips: dict[str, str] = {}
        self._env = None

    def env(self) -> dict:
        """The run's environment: with --sage-append, the folder's env.json when there is one (run_gpu.sh
        writes it once, before its first stage), with this session's command line added; else collected now."""
        if self._env is None:
            saved = records.read_json(self.recorder.results_dir / "env.json") if self.append else None
            if saved:
                saved.setdefault("sessions", []).append(environment.command_line())
                self._env = saved
            else:
                self._env = environment.collect_env()
        return self._env

    @property
    def recorder(self) -> records.Recorder:
        if self._recorder is None:
            if self.results_dir is None:
                self.results_dir = Path(tempfile.mkdtemp(prefix="sage-fast-bench-"))
            self._recorder = records.Recorder(self.results_dir, append=self.append)
        return self._recorder

    @property
    def used(self) -> bool:
        return self._recorder is not None


_STATE_KEY = pytest.StashKey[_SageSession]()
_ACTIVE: list[_SageSession] = []  # pytest_runtest_logreport gets no config: the session's state lives here


def _hypothesis_home() -> Path:
    """Hypothesis' folder outside the repository: one per user under the system temp dir (a cache)."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"sage-fast-hypothesis-{uid}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("--sage-append") and not config.getoption("--sage-results-dir"):
        raise pytest.UsageError("--sage-append needs --sage-results-dir (the folder to add to)")
    # Hypothesis writes ./.hypothesis (its example database and a cache of constants) unless told
    # otherwise; it reads this variable when it first touches its folder, after configuration.
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(_hypothesis_home()))
    state = _SageSession(config)
    config.stash[_STATE_KEY] = state
    _ACTIVE[:] = [state]


def _state(config) -> _SageSession:
    return config.stash[_STATE_KEY]


@pytest.fixture(scope="session")
def sage_session(pytestconfig) -> _SageSession:
    return _state(pytestconfig)


@pytest.fixture(scope="session")
def recorder(sage_session) -> records.Recorder:
    return sage_session.recorder


@pytest.fixture(scope="session")
def ceilings(sage_session) -> dict:
    """Copy bandwidth and matmul throughput of this device: measured once per session, or, with
    --sage-append, taken from the results folder's ceilings.json when it holds this device's (one
    measurement for all of run_gpu.sh's pytest sessions)."""
    if sage_session.ceilings is None:
        path = sage_session.recorder.results_dir / "ceilings.json"
        sage_session.ceilings = load_or_measure_ceilings(path, reuse=sage_session.append)
    return sage_session.ceilings


@pytest.fixture(scope="package", autouse=True)
def _cpu_threads(pytestconfig):
    """One CPU thread on CPU-only machines: on a small shared CI box, intra-op threads that wait for
    each other turn a 1 ms call into a 100 ms one at random; one thread gives repeatable numbers."""
    if ON_GPU:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, pytestconfig.getoption("--sage-cpu-threads")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def compile_enabled(pytestconfig) -> bool:
    value = pytestconfig.getoption("sage_compile")
    return ON_GPU if value is None else bool(value)


@pytest.fixture(scope="session")
def e2e_settings(pytestconfig) -> dict:
    classes = pytestconfig.getoption("--sage-e2e-classes") or (1000 if ON_GPU else 10)
    batch = pytestconfig.getoption("--sage-e2e-batch") or (128 if ON_GPU else 4)
    return {"classes": int(classes), "batch": int(batch)}


_RANK_ORDER = (32, 256, 4, 8)


def case_priority(params: dict) -> tuple:
    """Sort key of a benchmark case (its parametrisation): the cases a headline target needs first."""
    case = params.get("case")
    if hasattr(case, "r") and hasattr(case, "mode"):  # adapter
        rank = _RANK_ORDER.index(case.r) if case.r in _RANK_ORDER else len(_RANK_ORDER)
        return (0 if case.mode == "fwdbwd" else 1, 0 if case.dtype == "bf16" else 1, rank)
    if hasattr(case, "classes"):  # loss
        return (0 if case.mode == "fwdbwd" else 1, -case.classes, 0 if case.kind == "fit" else 1,
                0 if case.dtype == "fp32" else 1)
    if isinstance(case, str):  # train step / inference: FIT on first
        return ({"fit_on": 0, "fit_off": 1}.get(case, 2),)
    return ()


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--sage-priority"):
        return
    first_seen: dict = {}
    for item in items:
        first_seen.setdefault(item.nodeid.split("::")[0], len(first_seen))

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return (first_seen[item.nodeid.split("::")[0]], case_priority(params))

    items.sort(key=key)


def _is_benchmark_item(nodeid: str) -> bool:
    return "benchmarks/" in nodeid.replace("\\", "/") or nodeid.startswith("bench_")


def pytest_runtest_logreport(report):
    if report.skipped and _is_benchmark_item(report.nodeid):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if _ACTIVE:
            _ACTIVE[0].skips[report.nodeid] = reason.removeprefix("Skipped: ")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    state = _state(config)
    if not state.used:
        return
    state.recorder.refresh_ratios()
    output_json["sage_fast"] = {
        "env": state.env(),
        "ceilings": state.ceilings,
        "note": "each benchmark's extra_info holds its record: time_s (median), throughput, ratios",
    }


def pytest_sessionfinish(session, exitstatus):
    state = _state(session.config)
    if not state.used:
        return
    rec = state.recorder
    rec.refresh_ratios()
    records.write_json(rec.results_dir / "env.json", state.env())
    skips_path = rec.results_dir / "skipped.json"
    skips = (records.read_json(skips_path) or {}) if state.append else {}
    skips.update(state.skips)
    records.write_json(skips_path, skips)
    report.write_outputs(rec.results_dir)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = _state(config)
    if not state.used:
        return
    out = state.recorder.results_dir
    terminalreporter.write_sep("=", "sage-fast benchmark summary")
    summary = out / "summary.md"
    if summary.exists():
        terminalreporter.write_line(report.headline_text(out))
    terminalreporter.write_line(f"records: {out / 'records.jsonl'}")
    terminalreporter.write_line(f"summary: {summary}   chart: {out / 'chart.png'}")
