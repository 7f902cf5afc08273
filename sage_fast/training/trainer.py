"""The trainer: Sage's training loop, its step and its evaluations, on one process or under torchrun + DDP.

    sage-fast train --preset imagenet_lt data.root=/data/ImageNet_LT model.pretrained=/ckpt/clip.bin
    torchrun --nproc_per_node 8 -m sage_fast train --config run.yaml      # one node, 8 GPUs

Recipe (docs/method.md, "Training"): SGD with momentum on the trainable parameters only, a cosine schedule per
step over all epochs with no warm-up, bf16 autocast on CUDA and fp32 on CPU.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) every process builds the same model (local rank 0 first, so
pretrained weights are downloaded once per node), wraps it in DistributedDataParallel (NCCL on CUDA, gloo on
CPU) and reads its shard of every global batch (`optim.batch_size` is the global batch). Only rank 0 writes
files. A process that fails exits at once (no final barrier), so torchrun sees the failure and stops the
others instead of the job hanging.

Gradient accumulation (`optim.accumulate_steps` = k, for a batch whose activations do not fit): each process
splits its share of the batch into k micro-batches and runs forward and backward on each; their losses are
weighted by their share of the batch's readable images, so the one SGD step per batch is the full batch's
(up to float rounding), and the schedule, logs and checkpoints count batches as before. A checkpoint is only
ever at a batch boundary: a run stopped mid-accumulation repeats that batch on resume. Under DDP only the
last micro-batch all-reduces its gradients (``no_sync`` before it).

Determinism and resume: augmentations are drawn from per-sample seeds (`sage_fast.training.data`), so a run's
batches do not depend on the number of processes or on interruptions. A checkpoint (`checkpoint`) is written
atomically every `train.ckpt_every_steps` steps and at each epoch end; ``--resume`` continues from it to the
same final weights as an uninterrupted run.

After every step all ranks agree (one small all-reduce) on two flags: the weights went non-finite
(`Diverged`: nothing is saved, the message names the step and the last good checkpoint) and a rank got
SIGTERM or SIGUSR1 (`Preempted`, `preemption`: all stop after that same step, rank 0 writes a checkpoint).

Where the rest lives: the run folder's files and its claim in `run_folder`, the checkpoint format in
`checkpoint`, the logs in `run_log`, signals in `preemption`, the evaluation loop in `evaluation`, the reports
in `metrics`, the process set-up in `distributed`, the checks before anything is built in `preflight`.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..ops.backend import decide_backends
from ..ops.checks import NonFiniteError
from ..utils.files import atomic_write_text
from .checkpoint import (
    checkpoint_state,
    final_report,
    finished_run,
    nonfinite_entries,
    restore_checkpoint,
    resume_candidates,
    save_adapters,
    write_checkpoint,
)
from .config import SageConfig
from .data import GpuBatchTransform, LTData, TrainSampler, batch_on_device, build_data, build_loader
from .distributed import DistInfo, autocast, barrier, cleanup_distributed, is_main_process, reduce_sum, seed_everything
from .evaluation import evaluate_model
from .metrics import write_report
from .preemption import Preempted, StopSignals, signal_name
from .preflight import check_output_dir, preflight
from .run_folder import (
    CONFIG,
    EXPORT,
    LAST,
    PREVIOUS,
    check_claim,
    claim_run_folder,
    hold_run_folder,
    write_runtime_record,
)
from .run_log import RunLog


class Diverged(RuntimeError):
    """The weights went NaN / Inf: nothing was saved after the last good checkpoint, which the message names."""

    exit_code = 3

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def build_model(cfg: SageConfig, class_names, class_counts, device, progress: bool = True):
    """The `SageModel` of a run config, built right after seeding torch with ``train.seed``: with
    ``model.pretrained=null`` the frozen CLIP is random, and only the seed makes it the network a run trained
    (and that a later command loads the trained weights into)."""
    from ..model import build_sage

    torch.manual_seed(cfg.train.seed)
    return build_sage(class_names, class_counts, cfg.model, device=device, progress=progress)


def _no_buffer_sync_per_forward(ddp_class) -> dict:
    """DDP's switch for "do not broadcast the buffers before every forward" (they are the frozen model's, equal
    on every rank): ``forward_sync_buffers=False`` where torch has it (2.14 deprecates ``broadcast_buffers``
    with a FutureWarning on every rank), ``broadcast_buffers=False`` before."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


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
        # the user's mistakes first, before minutes of image checks and model building
        self.dist, self.image_size = preflight(cfg, dist_info)
        self.device = self.dist.device
        self.callbacks = list(callbacks)
        self.out_dir = Path(cfg.train.output_dir)
        self.progress = cfg.train.progress and self.dist.is_main
        world = self.dist.world_size
        seed_everything(cfg.train.seed)

        self.raw = bool(cfg.data.gpu_decode)
        self.data = data or build_data(cfg.data, self.image_size, raw=self.raw, progress=self.progress)
        # here, not after the model is built: it refuses a batch larger than the (readable) training set
        self.local_batch = cfg.optim.batch_size // world
        self.sampler = TrainSampler(self.data.train, self.local_batch, world, self.dist.rank, cfg.train.seed)
        # local rank 0 builds first, so pretrained weights are downloaded once into the cache that the
        # other processes of the node then read; every process passes exactly one barrier. The same seed on
        # every rank gives identical initial adapters (DDP also broadcasts rank 0's).
        first = self.dist.local_rank == 0
        if self.dist.distributed and not first:
            barrier(self.dist)
        self.model = build_model(cfg, self.data.class_names, self.data.class_counts, self.device,
                                 progress=self.progress)
        if self.dist.distributed and first:
            barrier(self.dist)
        # every op decided (and the kernels self-checked) now: 'triton' that cannot run stops here, and an
        # 'auto' fallback warns here, not in the first step
        amp_dtype = torch.bfloat16 if cfg.train.amp and self.device.type == "cuda" else torch.float32
        decide_backends(cfg.model.backend, self.device, tuple(dict.fromkeys((amp_dtype, torch.float32))))

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
                           find_unused_parameters=cfg.train.find_unused_parameters, **_no_buffer_sync_per_forward(DDP))
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.skipped_total = 0
        self.log = RunLog()  # opened by fit()
        self.stops = StopSignals(self.dist.distributed, self._preempted_in_eval)
        # where the newest good checkpoint is: (path, global step), or None before the first one
        self._last_good = None
        # False while out_dir/last.pt is a corrupt file that a resume skipped: it must not become previous.pt
        self._keep_previous = True
        self._recorded = False  # runtime.json written (after the first step)
        self._nonfinite_loss = False  # the loss of this step found NaN / Inf logits (`_step_flags` reads it)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint (format: `sage_fast.training.checkpoint`)."""
        progress = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                    "skipped_total": self.skipped_total}
        return checkpoint_state(self.model, self.optimizer, self.scheduler, progress, self.cfg.to_dict(),
                                self.data.class_names, self.data.class_counts)

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
                                      self.data.class_names, self.data.class_counts, self.device, force=force)
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
        path = Path(path) if path else self.out_dir / EXPORT
        save_adapters(path, self.model, self.cfg.to_dict(), self.data.class_names, self.data.class_counts,
                      {"epoch": self.epoch, "global_step": self.global_step})
        return path

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, batch) -> tuple:
        """Forward and backward of each of the `optim.accumulate_steps` micro-batches of this process's batch,
        then one SGD step and one scheduler step. -> (the batch's loss, images in this process's batch).

        Each micro-batch's loss (a mean over its images) is weighted by its share of the readable images of
        the global batch (`_loss_weights`), so the summed gradients are the gradient of the batch's mean loss.
        Under DDP only the last micro-batch's backward all-reduces (``no_sync`` before it)."""
        images, labels = batch_on_device(batch, self.device, self.gpu_train_tf)
        n = 0 if images is None else len(labels)
        if n == 0:
            # every image of the local batch was unreadable: a zero-weight dummy keeps DDP's collectives in step
            micro = [(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device),
                      torch.zeros(1, dtype=torch.long, device=self.device))]
        else:
            k = min(self.cfg.optim.accumulate_steps, n)  # fewer readable images than micro-batches: one each
            micro = list(zip(images.tensor_split(k), labels.tensor_split(k)))
        weights = self._loss_weights([0 if n == 0 else len(y) for _, y in micro])
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, ((x, y), w) in enumerate(zip(micro, weights)):
            last = i == len(micro) - 1
            with (self.net.no_sync() if self.dist.distributed and not last else contextlib.nullcontext()):
                with autocast(self.device, self.cfg.train.amp):
                    out = self.net(x)
                try:
                    loss, _ = self.model.loss(out, y)
                except NonFiniteError:
                    # the logits overflowed: the run diverged. A zero loss over the weights keeps this
                    # process's backward (DDP's all-reduce) in step with the others; the step flags then stop
                    # every rank before anything of this step is saved
                    self._nonfinite_loss = True
                    loss = sum(p.sum() for p in self.model.trainable_parameters()) * 0.0
                loss = loss * w
                loss.backward()
            total += loss.detach()
        self.optimizer.step()
        self.last_lr = self.scheduler.get_last_lr()[0]  # the lr this step used
        self.scheduler.step()
        return total, n

    def _loss_weights(self, sizes: Sequence[int]) -> list:
        """The weight of each micro-batch's mean loss: n_i R / N, for n_i readable images in it, R processes
        and N readable images in the global batch (summed over the processes: one all-reduce of one number).

        DDP averages the R processes' gradients, so the update is the gradient of the mean loss over the N
        images, however they are spread over processes and micro-batches. With every image readable and one
        micro-batch the weight is exactly 1 (n R / N in one division), which leaves such runs bit for bit
        as they were. A process without readable images weighs 0."""
        world = self.dist.world_size
        if not self.dist.distributed:
            total = max(sum(sizes), 1)
            return [n * world / total for n in sizes]
        count = torch.tensor(float(sum(sizes)), device=self.device)
        dist.all_reduce(count)
        count = count.clamp(min=1.0)
        # count.new_tensor(n R) / count, not n R / count: a number over a tensor is n R * (1 / count), two roundings
        return [count.new_tensor(float(n * world)) / count for n in sizes]

    def _step_flags(self, loss: Optional[torch.Tensor] = None):
        """After a step (its `loss`) or an epoch: (signal number that asked some rank to stop, or 0; what went
        NaN / Inf on some rank: "" when nothing, else "the loss (the logits overflowed)" or "the weights"),
        the same on every rank: one all-reduce of three numbers, one host sync."""
        flags = torch.zeros(3, device=self.device)
        flags[0] = float(self.stops.signum or 0)
        if loss is not None:
            flags[1] = (~self.model.finite_parameters()[1].all()).float()
            flags[2] = 1.0 if self._nonfinite_loss else (~torch.isfinite(loss)).float()
            self._nonfinite_loss = False
        if self.dist.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad_weights, bad_loss = flags.tolist()
        bad = "the loss (the logits overflowed)" if bad_loss else "the weights" if bad_weights else ""
        return int(stop), bad

    # -- training -----------------------------------------------------------------------------
    def fit(self, resume=None, overwrite: bool = False, force_resume: bool = False) -> dict:
        """Train for `optim.epochs` epochs (from a checkpoint when `resume` is a path), evaluate, write outputs.

        Rank 0 holds the output folder's lock throughout (`run_folder.hold_run_folder`), and the run claims the
        folder (`run_folder.claim_run_folder`): without `resume`, a folder that already holds a run is refused
        (`RunFolderError`) unless `overwrite`, which deletes that run's files first; a folder of foreign files is
        always refused. `force_resume`: see `load_checkpoint`.
        Raises `Preempted` after SIGTERM / SIGUSR1 (checkpoint written) and `Diverged` on NaN / Inf weights.
        Returns the final evaluation (see `accuracy_report`) plus ``skipped`` counts; a resumed run that had
        already finished is left as it is and returns its ``metrics.json`` with ``done_before`` True.
        """
        with hold_run_folder(self.out_dir, self.dist.is_main):
            return self._fit(resume, overwrite, force_resume)

    def _fit(self, resume, overwrite: bool, force_resume: bool) -> dict:
        if resume:
            self.load_checkpoint(resume, force=force_resume)
            at = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}
            done = final_report(self.out_dir, at, self.cfg.optim.epochs)
            if done is not None:
                return {**done, "done_before": True}
        claim_run_folder(self.out_dir, self.dist, fresh=not resume, overwrite=overwrite)
        if self.dist.is_main:
            atomic_write_text(self.out_dir / CONFIG, self.cfg.to_yaml())
        self.log = RunLog(self.out_dir, self.dist.is_main, self.cfg.train.tensorboard,
                          self.global_step if resume else None)
        # The weights are checked after every step (`_step_flags`) and a checkpoint only loads when finite:
        # the model's own check in every forward would be a second host sync per step for nothing.
        check_in_forward, self.model.check_finite = self.model.check_finite, False
        try:
            with self.stops.caught():
                while self.epoch < self.cfg.optim.epochs:
                    self._train_epoch()
                with self.stops.interruptible():
                    result = self.evaluate(write=True)
                    self.export_adapters()
        finally:
            self.model.check_finite = check_in_forward
            self.log.close()
        return result

    def _train_epoch(self) -> None:
        """The rest of the current epoch (from `step_in_epoch`), its checkpoint and its periodic evaluation."""
        from tqdm.auto import tqdm

        cfg, epoch = self.cfg, self.epoch
        self.model.train()
        self.sampler.set_epoch(epoch, start_batch=self.step_in_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not self.progress,
                   desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step", dynamic_ncols=True)
        loss_sum = torch.zeros((), device=self.device)
        loss_n = imgs = skipped = 0
        t0 = t_step = time.perf_counter()
        for batch in self.train_loader:
            skipped += batch.skipped
            loss, n = self.train_step(batch)
            if not self._recorded:
                self._record_runtime()
            loss_sum += loss
            loss_n += 1
            imgs += n
            self.step_in_epoch += 1
            self.global_step += 1
            stop, bad = self._step_flags(loss)
            if stop:
                self.stops.acknowledge()  # every rank got here: none is stuck
            now = time.perf_counter()
            self.stops.step_took(now - t_step)
            t_step = now
            if bad:
                raise self._diverged(self._nonfinite_names() if bad == "the weights" else bad)
            if self.global_step % cfg.train.log_every_steps == 0 or self.step_in_epoch == self.steps_per_epoch:
                mean_loss = reduce_sum(self.dist, float(loss_sum / max(loss_n, 1))) / self.dist.world_size
                dt = time.perf_counter() - t0
                ips = reduce_sum(self.dist, float(imgs)) / dt if dt > 0 else float("nan")
                self.log.write("train", step=self.global_step, epoch=epoch + 1, loss=mean_loss, lr=self.last_lr,
                               images_per_s=ips)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.last_lr:.2e}", img_s=f"{ips:.0f}")
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
        skipped = int(reduce_sum(self.dist, float(skipped)))
        self.skipped_total += skipped
        if skipped and self.dist.is_main:
            warnings.warn(f"epoch {epoch + 1}: {skipped} unreadable training images skipped "
                          f"({self.skipped_total} so far)")
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self.save_checkpoint()
        stop, _ = self._step_flags()
        if stop:
            self._stop_now(stop)
        ev = cfg.train.eval_every_epochs
        if ev and self.epoch % ev == 0 and self.epoch < cfg.optim.epochs:
            with self.stops.interruptible():
                self.evaluate(write=False)
        self._emit("epoch", self.epoch)

    def _record_runtime(self) -> None:
        """After this process's first step: rank 0 writes what ran (runtime.json) and, with the progress bars
        on, says it in one line of the console log."""
        self._recorded = True
        if self.dist.is_main:
            line = write_runtime_record(self.out_dir, self.model)
            if self.progress:
                print(f"runtime: {line}", file=sys.stderr, flush=True)

    def _emit(self, event: str, info) -> None:
        for cb in self.callbacks:
            cb(self, event, info)

    # -- stops --------------------------------------------------------------------------------
    def _nonfinite_names(self) -> str:
        names, finite = self.model.finite_parameters()
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
        return ", ".join(bad[:3]) or "some trainable parameters (on another rank)"

    def _diverged(self, what: str) -> Diverged:
        if self._last_good is None:
            good = "no checkpoint was written yet"
        else:
            good = f"the last good checkpoint is {self._last_good[0]} (step {self._last_good[1]})"
        return Diverged(f"training diverged at step {self.global_step}: {what} hold NaN or Inf, so nothing of "
                        f"this step was saved; {good}. Check the data, or resume with a lower optim.lr (and "
                        "--force-resume)", self.global_step)

    def _where(self) -> str:
        return f"rank {self.dist.rank}: " if self.dist.distributed else ""

    def _preempted_in_eval(self) -> Preempted:
        self.stops.acknowledge()
        return Preempted(f"{self._where()}{signal_name(self.stops.signum)} while evaluating after step "
                         f"{self.global_step}: checkpoint {self._last_good[0]}; continue with --resume",
                         self.global_step, agreed=False)

    def _stop_now(self, signum: int) -> None:
        """Checkpoint this step (unless just done) on rank 0, wait for it on every rank, raise `Preempted`."""
        self.stops.acknowledge()  # the ranks agreed to stop: none is stuck
        if self._last_good is None or self._last_good[1] != self.global_step:
            self.save_checkpoint()
        if self.dist.distributed:
            barrier(self.dist)
        at = (f"the end of epoch {self.epoch}" if self.step_in_epoch == 0 else
              f"step {self.step_in_epoch} of {self.steps_per_epoch} in epoch {self.epoch + 1}")
        raise Preempted(f"{self._where()}{signal_name(signum)} after step {self.global_step} ({at}): checkpoint "
                        f"{self._last_good[0]}; continue with --resume", self.global_step)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, write: bool = True, out_dir=None) -> dict:
        """Top-1 on the test split (`evaluation.evaluate_model`: sharded over ranks, counts summed), logged;
        with `write`, rank 0 also writes metrics.json, per_class.csv and per_class_accuracy.png into `out_dir`
        (default the output folder)."""
        report = evaluate_model(self.model, self.data, self.cfg, self.dist, self.image_size, self.progress,
                                self.gpu_test_tf)
        self.model.train()
        report["epoch"], report["step"] = self.epoch, self.global_step
        if report["skipped"] and self.dist.is_main:
            warnings.warn(f"evaluation: {report['skipped']} unreadable test images skipped")
        self.log.write("eval", step=self.global_step, epoch=self.epoch, overall=report["overall"],
                       many=report["many"], medium=report["medium"], few=report["few"], skipped=report["skipped"])
        if write and self.dist.is_main:
            write_report(Path(out_dir) if out_dir else self.out_dir, report, self.data)
        return report

    def close(self, ok: bool = True) -> None:
        """Release the process group; `ok` False after a failure (no barrier, see `cleanup_distributed`)."""
        cleanup_distributed(self.dist, ok)


def train(cfg: SageConfig, resume=None, callbacks: Sequence[Callable] = (), overwrite: bool = False,
          force_resume: bool = False) -> dict:
    """Build a `Trainer`, fit, clean up the process group.

    resume: a checkpoint path, or "auto" for ``output_dir/last.pt`` (or ``previous.pt``) when there is one
    and a fresh start otherwise. `force_resume`: `Trainer.load_checkpoint`.

    Before anything is built, rank 0 takes the output folder's lock (a folder another process holds is refused,
    `RunFolderBusy`) and checks the claim (`RunFolderError`: a folder of foreign files, or without `resume` one
    that holds a run, unless `overwrite`); a resume of a run that has already finished returns its
    ``metrics.json`` with ``done_before`` True and changes nothing.
    """
    out = Path(cfg.train.output_dir)
    if resume == "auto":
        resume = next((p for p in resume_candidates(out / LAST) if p.is_file()), None)
    elif resume and not any(p.is_file() for p in resume_candidates(resume)):
        raise FileNotFoundError(f"checkpoint to resume from not found: {resume}")
    main = is_main_process()
    if main:
        check_output_dir(out)  # its message names the key, before the lock makes the folder
    with hold_run_folder(out, main):
        if main:
            check_claim(out, fresh=not resume, overwrite=overwrite)
        if resume:
            done = finished_run(out, resume, cfg.to_dict(), force_resume)
            if done is not None:
                return {**done, "done_before": True}
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
