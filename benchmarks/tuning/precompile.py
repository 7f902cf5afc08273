"""Ahead-of-time compilation of the candidates in worker processes, in the order they will be timed, so
that the timing process finds them in Triton's cache (`Precompiler`; a worker calls the JIT's `warmup`
on placeholder CPU tensors: `_warm`)."""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, List, Optional, Sequence

import torch

from .launches import adapter_data, alloc_outputs, kernel_module, launch_spec, loss_data
from .problems import Problem, config_from_json, config_to_json


_PLACEHOLDERS: dict = {}


def _worker_init() -> None:
    """Workers run at lower priority: the main process times launches meanwhile."""
    try:
        os.nice(10)
    except OSError:
        pass


def _warm(problem_json: dict, config_json: dict) -> float:
    """Worker: compile one candidate through the JIT's `warmup` (the key the main process will look up in
    Triton's cache), on placeholder CPU tensors. Returns seconds."""
    p = Problem.from_json(problem_json)
    cfg = config_from_json(p.kernel, config_json)
    data = _PLACEHOLDERS.get(p)
    if data is None:
        data = _PLACEHOLDERS[p] = (loss_data if p.kernel == "loss" else adapter_data)(p, "cpu", placeholder=True)
        if p.kernel == "dw":
            data.mean = data.rstd = torch.empty(16)
            data.act = data.dh = torch.empty(16, dtype=p.torch_dtype)
        elif p.kernel == "dx":
            data.mean = data.rstd = torch.empty(16)
    t0 = time.time()
    fn, grid_, args, kwargs = launch_spec(kernel_module(p), p, data, cfg, alloc_outputs(p, data, cfg))
    fn.warmup(*args, grid=grid_, **kwargs)
    return time.time() - t0


class Precompiler:
    """A pool of worker processes compiling candidates ahead of the main process, in submission order."""

    def __init__(self, workers: int):
        import multiprocessing

        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init)
        self.futures: Dict[tuple, Future] = {}
        self.workers = workers
        self.broken = False
        self.errors: List[str] = []

    def submit(self, p: Problem, cfgs: Sequence) -> None:
        for c in cfgs:
            key = (p, c)
            if key not in self.futures:
                self.futures[key] = self.pool.submit(_warm, p.to_json(), config_to_json(c))

    def wait(self, p: Problem, c, timeout: float) -> Optional[str]:
        """Wait up to `timeout` s for cfg's compilation. Never rejects a candidate: on an error (noted in
        `errors`) or a timeout the main process compiles it itself, and only a failure there rejects it,
        so that a problem of the pool (e.g. a Triton version whose warmup differs) cannot reject the grid."""
        fut = self.futures.get((p, c))
        if fut is None or self.broken:
            return None
        try:
            fut.result(timeout=max(0.0, timeout))
        except TimeoutError:
            pass  # still compiling: the main process compiles it itself
        except BrokenProcessPool:
            self.broken = True  # a worker died: the main process compiles from now on
        except Exception as exc:  # noqa: BLE001 - recorded; the main process decides
            text = str(exc).strip().splitlines()
            self.errors.append(f"{p.name} {config_to_json(c)}: {type(exc).__name__}: {text[-1] if text else ''}"[:400])
        return None

    def stats(self) -> dict:
        done = [f for f in self.futures.values() if f.done() and not f.cancelled()]
        ok = [f.result() for f in done if f.exception() is None]
        return {"workers": self.workers, "submitted": len(self.futures), "done": len(done), "failed": len(done) - len(ok),
                "compile_s_median": statistics.median(ok) if ok else None, "compile_s_total": sum(ok),
                "broken": self.broken, "errors": self.errors[:20]}

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        procs = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # our own workers; one may be inside a compile
            if proc.is_alive():
                proc.terminate()
