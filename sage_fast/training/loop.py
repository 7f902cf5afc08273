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

Outputs in `train.output_dir` (rank 0): ``config.yaml``, ``last.pt`` (checkpoint), ``train_log.csv``
and ``eval_log.csv``, ``tb/`` (TensorBoard), ``metrics.json``, ``per_class.csv``,
``per_class_accuracy.png`` (see `sage_fast.training.metrics`) and ``adapters.safetensors`` (the trained
parameters, a small file).

This module holds the loop itself; the process set-up is in `distributed`, the files in `checkpoint`,
the accuracy and reports in `metrics`.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..model.clip import image_size
from .checkpoint import (
    atomic_torch_save,
    atomic_write_text,
    checkpoint_state,
    load_weights,
    restore_checkpoint,
    save_adapters,
)
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

    def save_checkpoint(self, path=None) -> Optional[Path]:
        """Rank 0 writes `last.pt` atomically; other ranks do nothing."""
        if not self.dist.is_main:
            return None
        path = Path(path) if path else self.out_dir / "last.pt"
        atomic_torch_save(self.state_dict(), path)
        return path

    def load_checkpoint(self, path) -> None:
        """Continue from `path`: weights, optimizer, scheduler, sampler position and RNG states."""
        progress = restore_checkpoint(path, self.model, self.optimizer, self.scheduler, self.cfg.to_dict(),
                                      self.data.class_counts, self.device)
        self.epoch, self.step_in_epoch = progress["epoch"], progress["step_in_epoch"]
        self.global_step, self.skipped_total = progress["global_step"], progress["skipped_total"]

    def export_adapters(self, path=None) -> Optional[Path]:
        """The trainable parameters (adapters, block scales, classifier, FIT s1 / s2) as safetensors, with the
        config and class names in the metadata."""
        if not self.dist.is_main:
            return None
        path = Path(path) if path else self.out_dir / "adapters.safetensors"
        save_adapters(path, self.model, self.cfg.to_dict(), self.data.class_names, self.data.class_counts)
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
    def fit(self, resume=None) -> dict:
        """Train for `optim.epochs` epochs (from a checkpoint when `resume` is a path), evaluate, write outputs.

        Returns the final evaluation (see `accuracy_report`) plus ``skipped`` counts.
        """
        from tqdm.auto import tqdm

        if resume:
            self.load_checkpoint(resume)
        elif self.dist.is_main and (self.out_dir / "last.pt").is_file():
            warnings.warn(f"{self.out_dir} holds a checkpoint from an earlier run; this run starts from scratch and "
                          "overwrites it (sage-fast train --resume continues it instead)")
        self._open_logs(self.global_step if resume else None)
        cfg = self.cfg
        log_every = cfg.train.log_every_steps
        try:
            while self.epoch < cfg.optim.epochs:
                epoch = self.epoch
                self.model.train()
                self.sampler.set_epoch(epoch, start_batch=self.step_in_epoch)
                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not self.progress,
                           desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step", dynamic_ncols=True)
                loss_sum = torch.zeros((), device=self.device)
                loss_n = imgs = 0
                skipped = 0
                t0 = time.perf_counter()
                for batch in self.train_loader:
                    skipped += batch.skipped
                    loss, n = self.train_step(batch)
                    loss_sum += loss
                    loss_n += 1
                    imgs += n
                    self.step_in_epoch += 1
                    self.global_step += 1
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
                bar.close()
                skipped = int(self._reduce_sum(float(skipped)))
                self.skipped_total += skipped
                if skipped and self.dist.is_main:
                    warnings.warn(f"epoch {epoch + 1}: {skipped} unreadable training images skipped "
                                  f"({self.skipped_total} so far)")
                self.epoch, self.step_in_epoch = epoch + 1, 0
                self.save_checkpoint()
                ev = cfg.train.eval_every_epochs
                if ev and self.epoch % ev == 0 and self.epoch < cfg.optim.epochs:
                    self.evaluate(write=False)
                self._emit("epoch", self.epoch)
            result = self.evaluate(write=True)
            self.export_adapters()
        finally:
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return result

    def _reduce_sum(self, value: float) -> float:
        return reduce_sum(self.dist, value)

    def _reduce_mean(self, t: torch.Tensor) -> float:
        return reduce_sum(self.dist, float(t)) / self.dist.world_size

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, write: bool = True) -> dict:
        """Top-1 on the test split (sharded over ranks, counts summed), logged; with `write`, rank 0 also
        writes metrics.json, per_class.csv and per_class_accuracy.png."""
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
            self.write_report(report)
        return report

    def write_report(self, report: dict) -> None:
        """metrics.json, per_class.csv and per_class_accuracy.png in the output folder (`metrics.write_report`)."""
        write_report(self.out_dir, report, self.data)

    def close(self, ok: bool = True) -> None:
        """Release the process group; `ok` False after a failure (no barrier, see `cleanup_distributed`)."""
        cleanup_distributed(self.dist, ok)


def _no_persist(data_cfg):
    """Evaluation loaders are built per call: persistent workers would outlive them."""
    c = copy.copy(data_cfg)
    c.persistent_workers = False
    return c


def train(cfg: SageConfig, resume=None, callbacks: Sequence[Callable] = ()) -> dict:
    """Build a `Trainer`, fit, clean up the process group. `resume`: a checkpoint path, or "auto" for
    ``output_dir/last.pt`` when it exists."""
    if resume == "auto":
        last = Path(cfg.train.output_dir) / "last.pt"
        resume = last if last.is_file() else None
    elif resume and not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {resume}")
    trainer = Trainer(cfg, callbacks=callbacks)
    ok = False
    try:
        result = trainer.fit(resume=resume)
        ok = True
        return result
    finally:
        trainer.close(ok)


def evaluate_weights(cfg: SageConfig, weights) -> dict:
    """Load trained parameters (checkpoint or safetensors export) into a fresh model and evaluate."""
    trainer = Trainer(cfg)
    ok = False
    try:
        trainer.model.load_trainable_state_dict({k: v.to(trainer.device) for k, v in load_weights(weights).items()})
        if trainer.dist.is_main:
            trainer.out_dir.mkdir(parents=True, exist_ok=True)
        result = trainer.evaluate(write=True)
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
