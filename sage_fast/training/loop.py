"""Training and evaluation of Sage: one process, several GPUs or several nodes (torchrun + DDP).

    sage-fast train --preset imagenet_lt data.root=/data/ImageNet_LT model.pretrained=/ckpt/clip.bin
    torchrun --nproc_per_node 8 -m sage_fast train --config run.yaml      # one node, 8 GPUs
    sage-fast eval --weights runs/sage/adapters.safetensors

Recipe (docs/method.md, "Training"): SGD with momentum on the trainable parameters only, a cosine schedule per
step over all epochs with no warm-up, bf16 autocast on CUDA and fp32 on CPU.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) every process builds the same model (local rank 0
first, so pretrained weights are downloaded once per node), wraps it in DistributedDataParallel (NCCL
on CUDA, gloo on CPU) and reads its shard of every global batch (`optim.batch_size` is the global batch).
Only rank 0 writes files. A process that fails exits at once (no final barrier), so torchrun sees the
failure and stops the others instead of the job hanging.

Determinism and resume: augmentations are drawn from per-sample seeds (see `sage_fast.training.data`), so a
run's batches do not depend on the number of processes or on interruptions. A checkpoint holds the
trainable parameters, optimizer, scheduler, sampler position (epoch, step in epoch), RNG states and the
config (format: `sage_fast.training.checkpoint`); it is written atomically every `train.ckpt_every_steps`
steps and at each epoch end, and ``--resume`` continues from it to the same final weights as an
uninterrupted run.

Outputs in `train.output_dir` (rank 0): ``config.yaml``, ``last.pt`` and ``previous.pt`` (the newest
checkpoint and the one before), ``train_log.csv`` and ``eval_log.csv``, ``tb/`` (TensorBoard),
``metrics.json``, ``per_class.csv``, ``per_class_accuracy.png`` (see `sage_fast.training.metrics`) and
``adapters.safetensors`` (the trained parameters, a small file). `evaluate_weights` writes its reports
into a folder of its own (default ``train.output_dir/eval``), never over the training run's.

Run safety: a fresh run refuses a folder that holds a run (`RunFolderError`) unless told to overwrite it;
a resume refuses a checkpoint whose settings differ in a way that changes the result, and falls back from
a corrupt ``last.pt`` to ``previous.pt`` (`sage_fast.training.checkpoint`). After every step all ranks
agree (one small all-reduce) on two flags: the weights went non-finite (`Diverged`: nothing is saved, the
message names the step and the last good checkpoint) and a rank got SIGTERM or SIGUSR1 (`Preempted`: all
stop after that same step, rank 0 writes a checkpoint, and a resume continues exactly).

This module holds the loop itself; the process set-up is in `distributed`, the files in `checkpoint`,
the accuracy and reports in `metrics`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..model.clip import image_size
from .checkpoint import (
    LAST,
    PREVIOUS,
    RunFolderError,
    checkpoint_state,
    clear_run_files,
    folder_in_use_error,
    nonfinite_entries,
    read_weights,
    remove_stale_temporaries,
    restore_checkpoint,
    resume_candidates,
    run_markers,
    save_adapters,
    write_checkpoint,
)
from ..utils.files import atomic_write_text
from .config import SageConfig
from .data import (
    GpuBatchTransform,
    LTData,
    ShardSampler,
    TrainSampler,
    build_data,
    build_loader,
    measure_input_pipeline,
)
from .distributed import DistInfo, barrier, cleanup_distributed, reduce_sum, seed_everything, setup_distributed
from .errors import UserError
from .metrics import CSVLog, accuracy_report, write_report
from .preflight import check_device, check_model_source, check_output_dir
from .tte import tte_dataset, tte_logits

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


class Diverged(RuntimeError):
    """The weights went NaN / Inf: nothing was saved after the last good checkpoint, which the message names."""

    exit_code = 3

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def build_model_from_config(cfg: SageConfig, class_names, class_counts, device, progress: bool = True):
    from ..model import build_sage

    return build_sage(class_names, class_counts, cfg.model, device=device, progress=progress)


def cosine_lambda(total_steps: int) -> Callable[[int], float]:
    """lr factor at step t: 0.5 (1 + cos(pi t / T)), no warm-up; reaches 0 after the last step."""
    total = max(int(total_steps), 1)
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


class Trainer:
    """Builds data, model, optimizer and loaders from a `SageConfig`; `fit()` trains, `evaluate()` tests.

    callbacks: functions ``cb(trainer, event, info)`` called on rank 0 and the others alike, with event
    "step" (info: global step) and "epoch" (info: epoch just finished). An exception raised by a callback
    stops training like a crash would (the tests use it to interrupt a run).
    """

    def __init__(self, cfg: SageConfig, data: Optional[LTData] = None, callbacks: Sequence[Callable] = (),
                 dist_info: Optional[DistInfo] = None):
        self.cfg = cfg
        # the user's mistakes first (preflight), before minutes of image checks and model building
        if dist_info is None:
            check_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = dist_info or setup_distributed(cfg.train.device)
        self.device = self.dist.device
        self.callbacks = list(callbacks)
        self.out_dir = Path(cfg.train.output_dir)
        if self.dist.is_main:
            check_output_dir(self.out_dir)
        check_model_source(cfg.model)
        self.progress = cfg.train.progress and self.dist.is_main
        world = self.dist.world_size
        if cfg.optim.batch_size % world:
            raise UserError(f"optim.batch_size={cfg.optim.batch_size} (the global batch) is not divisible by the "
                            f"{world} processes: use a multiple of {world}")
        seed_everything(cfg.train.seed)

        self.image_size = cfg.data.image_size or image_size(cfg.model.name)
        if self.image_size != image_size(cfg.model.name):
            raise UserError(f"data.image_size={self.image_size} but {cfg.model.name} takes "
                            f"{image_size(cfg.model.name)} px images (its position embeddings are fixed): leave "
                            "data.image_size null")
        self.raw = bool(cfg.data.gpu_decode)
        self.data = data or build_data(cfg.data, self.image_size, raw=self.raw, progress=self.progress)
        # here, not after the model is built: it refuses a batch larger than the (readable) training set
        self.local_batch = cfg.optim.batch_size // world
        self.sampler = TrainSampler(self.data.train, self.local_batch, world, self.dist.rank, cfg.train.seed)
        # the same seed on every rank: identical initial adapters (DDP also broadcasts rank 0's)
        torch.manual_seed(cfg.train.seed)
        # local rank 0 builds first, so pretrained weights are downloaded once into the cache that the
        # other processes of the node then read; every process passes exactly one barrier
        first = self.dist.local_rank == 0
        if self.dist.distributed and not first:
            barrier(self.dist)
        self.model = build_model_from_config(cfg, self.data.class_names, self.data.class_counts, self.device,
                                             progress=self.progress)
        if self.dist.distributed and first:
            barrier(self.dist)
        if self.model.image_size != self.image_size:
            raise ValueError(f"data.image_size={self.image_size} but {cfg.model.name} takes {self.model.image_size} px "
                             "images (its position embeddings are fixed): leave data.image_size null")
        self.amp = bool(cfg.train.amp and self.device.type == "cuda")

        pin = cfg.data.pin_memory and self.device.type == "cuda"
        self.train_loader = build_loader(self.data.train, self.local_batch, self.sampler, cfg.data, pin, train=True)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        # decode failures on the GPU count towards data.max_unreadable like those of the loaders
        self.gpu_train_tf = (GpuBatchTransform(self.image_size, True, self.device, cfg.data.crop_scale,
                                               cfg.data.train_augment, unreadable=self.data.train.unreadable)
                             if self.raw else None)
        self.gpu_test_tf = (GpuBatchTransform(self.image_size, False, self.device,
                                              unreadable=self.data.test.unreadable) if self.raw else None)

        self.optimizer = torch.optim.SGD(self.model.trainable_parameters(), lr=cfg.optim.lr,
                                         momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        factor = cosine_lambda(self.total_steps) if cfg.optim.schedule == "cosine" else (lambda t: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

        self.net = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           broadcast_buffers=False, find_unused_parameters=cfg.train.find_unused_parameters)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.skipped_total = 0
        self._tb = None
        self._logs: Dict[str, CSVLog] = {}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint (format: `sage_fast.training.checkpoint`)."""
        progress = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                    "skipped_total": self.skipped_total}
        return checkpoint_state(self.model, self.optimizer, self.scheduler, progress, self.cfg.to_dict(),
                                self.data.class_names, self.data.class_counts)

    # where the newest good checkpoint is: (path, global step), or None before the first one
    _last_good = None
    # a stop signal's number once one came during fit(); whether the handler raises at once (`_interruptible`)
    _stop_signal = None
    _signal_raises = False
    _watchdog = None
    # the longest time between two step boundaries so far (seconds), for `_stop_grace`
    _slowest_step = 0.0
    # False while out_dir/last.pt is a corrupt file that a resume skipped: it must not become previous.pt
    _keep_previous = True

    def save_checkpoint(self, path=None) -> Optional[Path]:
        """Rank 0 writes `last.pt` atomically, the one it replaces becoming `previous.pt`; other ranks only
        note where it is. Raises `Diverged` (nothing written) when the weights or optimizer state hold NaN / Inf."""
        path = Path(path) if path else self.out_dir / LAST
        if self.dist.is_main:
            state = self.state_dict()
            bad = nonfinite_entries(state)
            if bad:
                raise self._diverged(", ".join(bad[:3]))
            write_checkpoint(state, path, keep_previous=self._keep_previous)
            self._keep_previous = True
        self._last_good = (path, self.global_step)
        return path if self.dist.is_main else None

    def load_checkpoint(self, path, force: bool = False) -> None:
        """Continue from `path` (or, when it is a corrupt ``last.pt``, the ``previous.pt`` beside it, with a
        warning): weights, optimizer, scheduler, sampler position and RNG states. `force`: resume even when
        settings that change the result differ from the checkpoint's (`restore_checkpoint`)."""
        progress = restore_checkpoint(path, self.model, self.optimizer, self.scheduler, self.cfg.to_dict(),
                                      self.data.class_counts, self.device, force=force)
        self.epoch, self.step_in_epoch = progress["epoch"], progress["step_in_epoch"]
        self.global_step, self.skipped_total = progress["global_step"], progress["skipped_total"]
        used = progress["path"]
        if progress["skipped"]:
            if self.dist.is_main:
                warnings.warn(f"{'; '.join(progress['skipped'])}; resuming from {used} (step {self.global_step}) "
                              "instead")
            if used.name == PREVIOUS and used.parent.resolve() == self.out_dir.resolve():
                self._keep_previous = False
        self._last_good = (used, self.global_step)

    def export_adapters(self, path=None) -> Optional[Path]:
        """The trainable parameters (adapters, block scales, classifier, FIT s1 / s2) as safetensors, with the
        config and class names in the metadata."""
        if not self.dist.is_main:
            return None
        path = Path(path) if path else self.out_dir / "adapters.safetensors"
        save_adapters(path, self.model, self.cfg.to_dict(), self.data.class_names, self.data.class_counts,
                      {"epoch": self.epoch, "global_step": self.global_step})
        return path

    # -- logging ------------------------------------------------------------------------------
    def _open_logs(self, resume_step: Optional[int]) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "config.yaml", self.cfg.to_yaml())
        self._logs["train"] = CSVLog(self.out_dir / "train_log.csv",
                                     ["step", "epoch", "loss", "lr", "images_per_s"], resume_step)
        self._logs["eval"] = CSVLog(self.out_dir / "eval_log.csv",
                                    ["step", "epoch", "overall", "many", "medium", "few", "skipped"], resume_step)
        if self.cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: no TensorBoard log (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=resume_step)

    def _log(self, kind: str, **row) -> None:
        if not self.dist.is_main:
            return
        if kind in self._logs:
            self._logs[kind].write(**row)
        if self._tb is not None:
            step = row["step"]
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()

    def _emit(self, event: str, info) -> None:
        for cb in self.callbacks:
            cb(self, event, info)

    # -- one step -----------------------------------------------------------------------------
    def _prepare(self, batch, train: bool):
        labels = batch.labels
        images = batch.images
        if images is not None and self.raw:
            tf = self.gpu_train_tf if train else self.gpu_test_tf
            images, keep = tf(images, batch.seeds)
            labels = labels[keep]
        if images is None or len(labels) == 0:
            return None, labels.to(self.device)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def train_step(self, batch) -> tuple:
        """Forward, loss, backward, SGD step, scheduler step. -> (loss, images in this process's batch)."""
        images, labels = self._prepare(batch, train=True)
        empty = images is None
        if empty:
            # every image of the local batch was unreadable: a zero-weight dummy keeps DDP's collectives in step
            images = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            labels = torch.zeros(1, dtype=torch.long, device=self.device)
        with self._autocast():
            out = self.net(images)
        loss, _ = self.model.loss(out, labels)
        if empty:
            loss = loss * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_lr = self.scheduler.get_last_lr()[0]  # the lr this step used
        self.scheduler.step()
        return loss.detach(), (0 if empty else len(labels))

    # -- training -----------------------------------------------------------------------------
    def fit(self, resume=None, overwrite: bool = False, force_resume: bool = False) -> dict:
        """Train for `optim.epochs` epochs (from a checkpoint when `resume` is a path), evaluate, write outputs.

        Without `resume`, a folder that already holds a run is refused (`RunFolderError`) unless `overwrite`,
        which deletes that run's files first. `force_resume`: see `load_checkpoint`.
        Raises `Preempted` after SIGTERM / SIGUSR1 (checkpoint written) and `Diverged` on NaN / Inf weights.
        Returns the final evaluation (see `accuracy_report`) plus ``skipped`` counts.
        """
        from tqdm.auto import tqdm

        self._stop_signal = None
        if self.dist.is_main:
            remove_stale_temporaries(self.out_dir)
        if resume:
            self.load_checkpoint(resume, force=force_resume)
        else:
            self._claim_folder(overwrite)
        self._open_logs(self.global_step if resume else None)
        cfg = self.cfg
        log_every = cfg.train.log_every_steps
        signals = contextlib.ExitStack()
        # The weights are checked after every step (`_step_flags`) and a checkpoint only loads when finite:
        # the model's own check in every forward would be a second host sync per step for nothing.
        check_in_forward, self.model.check_finite = self.model.check_finite, False
        try:
            signals.enter_context(self._stop_signals_caught())
            while self.epoch < cfg.optim.epochs:
                epoch = self.epoch
                self.model.train()
                self.sampler.set_epoch(epoch, start_batch=self.step_in_epoch)
                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not self.progress,
                           desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step", dynamic_ncols=True)
                loss_sum = torch.zeros((), device=self.device)
                loss_n = imgs = 0
                skipped = 0
                t0 = t_step = time.perf_counter()
                for batch in self.train_loader:
                    skipped += batch.skipped
                    loss, n = self.train_step(batch)
                    loss_sum += loss
                    loss_n += 1
                    imgs += n
                    self.step_in_epoch += 1
                    self.global_step += 1
                    stop, bad = self._step_flags()
                    if stop:
                        self._acknowledge_stop()  # every rank got here: none is stuck
                    now = time.perf_counter()
                    self._slowest_step, t_step = max(self._slowest_step, now - t_step), now
                    if bad:
                        raise self._diverged(self._nonfinite_names())
                    if self.global_step % log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                        mean_loss = self._reduce_mean(loss_sum / max(loss_n, 1))
                        dt = time.perf_counter() - t0
                        ips = self._reduce_sum(float(imgs)) / dt if dt > 0 else float("nan")
                        lr = self.last_lr
                        self._log("train", step=self.global_step, epoch=epoch + 1, loss=mean_loss, lr=lr,
                                  images_per_s=ips)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                        loss_sum.zero_()
                        loss_n = imgs = 0
                        t0 = time.perf_counter()
                    bar.update(1)
                    every = cfg.train.ckpt_every_steps
                    if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                        self.save_checkpoint()
                    self._emit("step", self.global_step)
                    if stop:
                        self._stop_now(stop)
                bar.close()
                skipped = int(self._reduce_sum(float(skipped)))
                self.skipped_total += skipped
                if skipped and self.dist.is_main:
                    warnings.warn(f"epoch {epoch + 1}: {skipped} unreadable training images skipped "
                                  f"({self.skipped_total} so far)")
                self.epoch, self.step_in_epoch = epoch + 1, 0
                self.save_checkpoint()
                stop, _ = self._step_flags(check_weights=False)
                if stop:
                    self._stop_now(stop)
                ev = cfg.train.eval_every_epochs
                if ev and self.epoch % ev == 0 and self.epoch < cfg.optim.epochs:
                    with self._interruptible():
                        self.evaluate(write=False)
                self._emit("epoch", self.epoch)
            with self._interruptible():
                result = self.evaluate(write=True)
                self.export_adapters()
        finally:
            self.model.check_finite = check_in_forward
            signals.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return result

    def _claim_folder(self, overwrite: bool) -> None:
        """A fresh run: refuse a folder holding a run unless `overwrite`; clear what an earlier run left there."""
        found = run_markers(self.out_dir) if self.dist.is_main else []
        refuse = bool(found) and not overwrite
        # rank 0 decides (other nodes may not see the folder); every rank then raises or goes on together
        if self.dist.distributed:
            refuse = self._reduce_sum(float(refuse)) > 0
        if refuse:
            raise folder_in_use_error(self.out_dir, found) if found else RunFolderError(
                f"{self.out_dir} already holds a run (rank 0 refused to overwrite it)")
        if self.dist.is_main:
            clear_run_files(self.out_dir)

    @contextlib.contextmanager
    def _stop_signals_caught(self):
        """On every rank: SIGTERM / SIGUSR1 only set a flag that the next step boundary acts on. DataLoader
        workers forked meanwhile ignore them unless their parent sends them (`_after_fork_in_child`)."""
        global _catching_pid
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("fit() runs outside the main thread: SIGTERM / SIGUSR1 cannot be caught, a preempted run "
                          "loses the steps since its last checkpoint")
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is None:
                self._stop_signal = signum
            if self._signal_raises:
                raise self._preempted_in_eval()

        _register_fork_hook()
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        self._watchdog = _StuckRankWatchdog(self._stop_grace) if self.dist.distributed else None
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

    def _stop_grace(self) -> float:
        """Seconds a rank may take from a stop signal to the stop: the step under way and the all-reduce after it."""
        return max(5.0, 3.0 * self._slowest_step)

    def _acknowledge_stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.acknowledge()

    @contextlib.contextmanager
    def _interruptible(self):
        """A block that only evaluates or exports what the newest checkpoint already holds: a stop signal ends
        it at once (`Preempted`, not agreed between ranks), since a resume loses nothing but this block, and an
        evaluation can outlast the grace period before SIGKILL."""
        if self._stop_signal is not None:
            raise self._preempted_in_eval()
        self._signal_raises = True
        try:
            yield
        finally:
            self._signal_raises = False

    def _preempted_in_eval(self) -> Preempted:
        self._acknowledge_stop()
        name = _signal_name(self._stop_signal)
        where = f"rank {self.dist.rank}: " if self.dist.distributed else ""
        return Preempted(f"{where}{name} while evaluating after step {self.global_step}: checkpoint "
                         f"{self._last_good[0]}; continue with --resume", self.global_step, agreed=False)

    def _step_flags(self, check_weights: bool = True):
        """(signal number that asked some rank to stop, or 0; whether the weights hold NaN / Inf), the same on
        every rank: one all-reduce of two numbers, one host sync."""
        flags = torch.zeros(2, device=self.device)
        flags[0] = float(self._stop_signal or 0)
        if check_weights:
            flags[1] = (~self.model.finite_parameters()[1].all()).float()
        if self.dist.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        return int(stop), bool(bad)

    def _nonfinite_names(self) -> str:
        names, finite = self.model.finite_parameters()
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
        return ", ".join(bad[:3]) or "some trainable parameters (on another rank)"

    def _diverged(self, what: str) -> Diverged:
        if self._last_good is None:
            good = "no checkpoint was written yet"
        else:
            good = f"the last good checkpoint is {self._last_good[0]} (step {self._last_good[1]})"
        return Diverged(f"training diverged at step {self.global_step}: {what} hold NaN or "
                        f"Inf after the update, so nothing of it was saved; {good}. Check the data, or resume with a "
                        "lower optim.lr (and --force-resume)", self.global_step)

    def _stop_now(self, signum: int) -> None:
        """Checkpoint this step (unless just done) on rank 0, wait for it on every rank, raise `Preempted`."""
        self._acknowledge_stop()  # the ranks agreed to stop: none is stuck
        if self._last_good is None or self._last_good[1] != self.global_step:
            self.save_checkpoint()
        if self.dist.distributed:
            barrier(self.dist)
        name = _signal_name(signum)
        where = f"rank {self.dist.rank}: " if self.dist.distributed else ""
        at = (f"the end of epoch {self.epoch}" if self.step_in_epoch == 0 else
              f"step {self.step_in_epoch} of {self.steps_per_epoch} in epoch {self.epoch + 1}")
        raise Preempted(f"{where}{name} after step {self.global_step} ({at}): checkpoint {self._last_good[0]}; "
                        "continue with --resume", self.global_step)

    def _reduce_sum(self, value: float) -> float:
        return reduce_sum(self.dist, value)

    def _reduce_mean(self, t: torch.Tensor) -> float:
        return reduce_sum(self.dist, float(t)) / self.dist.world_size

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, write: bool = True, out_dir=None) -> dict:
        """Top-1 on the test split (sharded over ranks, counts summed), logged; with `write`, rank 0 also
        writes metrics.json, per_class.csv and per_class_accuracy.png into `out_dir` (default the output folder)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        num_classes = self.model.num_classes
        sampler = ShardSampler(len(self.data.test), self.dist.world_size, self.dist.rank)
        test_set = tte_dataset(self.data.test, cfg.eval.tte, self.image_size)  # eval.tte: n crops per image
        loader = build_loader(test_set, cfg.train.eval_batch_size, sampler,
                              _no_persist(cfg.data), cfg.data.pin_memory and self.device.type == "cuda", train=False)
        correct = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        total = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        skipped = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.model.eval()
        t0, n = time.perf_counter(), 0
        bar = tqdm(loader, disable=not self.progress, desc="eval", unit="batch", dynamic_ncols=True)
        for batch in bar:
            skipped += batch.skipped
            images, labels = self._prepare(batch, train=False)
            if images is None:
                continue
            with self._autocast():
                pred = tte_logits(self.model, images).argmax(dim=-1)
            total += torch.bincount(labels, minlength=num_classes).double()
            correct += torch.bincount(labels[pred == labels], minlength=num_classes).double()
            n += len(labels)
            bar.set_postfix(img_s=f"{n / max(time.perf_counter() - t0, 1e-9):.0f}")
        bar.close()
        self.model.train()
        if self.dist.distributed:
            for t in (correct, total, skipped):
                dist.all_reduce(t)
        report = accuracy_report(correct, total, self.data.group_counts)
        report["skipped"] = int(skipped.item())
        report["epoch"], report["step"] = self.epoch, self.global_step
        if report["skipped"] and self.dist.is_main:
            warnings.warn(f"evaluation: {report['skipped']} unreadable test images skipped")
        self._log("eval", step=self.global_step, epoch=self.epoch, overall=report["overall"], many=report["many"],
                  medium=report["medium"], few=report["few"], skipped=report["skipped"])
        if write and self.dist.is_main:
            self.write_report(report, out_dir)
        return report

    def write_report(self, report: dict, out_dir=None) -> None:
        """metrics.json, per_class.csv and per_class_accuracy.png in `out_dir` (default the output folder;
        `metrics.write_report`)."""
        write_report(Path(out_dir) if out_dir else self.out_dir, report, self.data)

    def close(self, ok: bool = True) -> None:
        """Release the process group; `ok` False after a failure (no barrier, see `cleanup_distributed`)."""
        cleanup_distributed(self.dist, ok)


# the process inside `Trainer._stop_signals_caught`, if any (a forked child sees its parent's pid here)
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
            print(f"sage-fast: {_signal_name(signum)}: this process did not reach the end of its step within "
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


def _signal_name(signum) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _no_persist(data_cfg):
    """Evaluation loaders are built per call: persistent workers would outlive them."""
    c = copy.copy(data_cfg)
    c.persistent_workers = False
    return c


def train(cfg: SageConfig, resume=None, callbacks: Sequence[Callable] = (), overwrite: bool = False,
          force_resume: bool = False) -> dict:
    """Build a `Trainer`, fit, clean up the process group.

    resume: a checkpoint path, or "auto" for ``output_dir/last.pt`` (or ``previous.pt``) when there is one
    and a fresh start otherwise. Without it, an output folder that holds a run is refused
    (`RunFolderError`, before anything is built) unless `overwrite`. `force_resume`: `Trainer.load_checkpoint`.
    """
    out = Path(cfg.train.output_dir)
    if resume == "auto":
        resume = next((p for p in resume_candidates(out / LAST) if p.is_file()), None)
    elif resume and not any(p.is_file() for p in resume_candidates(resume)):
        raise FileNotFoundError(f"checkpoint to resume from not found: {resume}")
    if not resume and not overwrite:
        found = run_markers(out)
        if found:
            raise folder_in_use_error(out, found)
    trainer = Trainer(cfg, callbacks=callbacks)
    ok = False
    try:
        result = trainer.fit(resume=resume, overwrite=overwrite, force_resume=force_resume)
        ok = True
        return result
    except Preempted as e:
        ok = e.agreed  # then every rank stopped at the same step and passed the same barrier
        raise
    finally:
        trainer.close(ok)


def evaluate_weights(cfg: SageConfig, weights, out_dir=None) -> dict:
    """Load trained parameters (checkpoint or safetensors export, verified) into a fresh model, evaluate,
    and write the reports into `out_dir` (default ``train.output_dir/eval``), never over a training run's.

    The report's ``epoch`` / ``step`` are those of the weights (None where the file does not say), and
    ``weights`` names the file."""
    out = Path(out_dir) if out_dir else Path(cfg.train.output_dir) / "eval"
    if (out / LAST).exists() or (out / "train_log.csv").exists():
        raise RunFolderError(f"{out} holds a training run: evaluation writes its reports elsewhere (--out)")
    tensors, info = read_weights(weights)
    trainer = Trainer(cfg)
    ok = False
    try:
        trainer.model.load_trainable_state_dict({k: v.to(trainer.device) for k, v in tensors.items()})
        trainer.epoch, trainer.global_step = info["epoch"], info["step"]
        if trainer.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)
        result = trainer.evaluate(write=False)
        result["weights"] = str(weights)
        if trainer.dist.is_main:
            trainer.write_report(result, out)
        ok = True
        return result
    finally:
        trainer.close(ok)


def bench_input_pipeline(cfg: SageConfig, num_batches: int = 50) -> dict:
    """Images/s of the training input pipeline alone (read, decode, augment, collate; no model)."""
    size = cfg.data.image_size or image_size(cfg.model.name)
    data = build_data(cfg.data, size, raw=cfg.data.gpu_decode)
    sampler = TrainSampler(data.train, cfg.optim.batch_size, 1, 0, cfg.train.seed)
    loader = build_loader(data.train, cfg.optim.batch_size, sampler, cfg.data, pin_memory=False, train=True)
    out = measure_input_pipeline(loader, num_batches)
    if cfg.data.gpu_decode:
        out["note"] = "gpu_decode: workers only read bytes here; decoding happens in the training step"
    return out
