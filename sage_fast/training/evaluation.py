"""Top-1 accuracy of a model on a test split, sharded over the processes of a run.

Used by the trainer (its periodic and final evaluations) and by ``sage-fast eval`` (`inference.evaluate_weights`),
so both evaluate alike: rank r reads every R-th test image (no padding, no image twice), ``eval.tte`` crops
when asked, bf16 autocast on CUDA when ``train.amp``, and the per-class counts are summed over the ranks.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

from .data import ShardSampler, batch_on_device, build_loader
from .distributed import autocast
from .metrics import accuracy_report
from .tte import tte_dataset, tte_logits


def _no_persist(data_cfg):
    """Evaluation loaders are built per call: persistent workers would outlive them."""
    c = copy.copy(data_cfg)
    c.persistent_workers = False
    return c


@torch.no_grad()
def evaluate_model(model, data, cfg, dist_info, image_size: int, progress: bool = False, gpu_transform=None) -> dict:
    """`accuracy_report` of `model` on ``data.test`` (an `LTData`), plus ``skipped`` (unreadable test images).

    cfg: the run config (``eval.tte``, ``train.eval_batch_size``, ``train.amp``, ``data``); dist_info: the
    process's `DistInfo` (every rank must call this); gpu_transform: the test split's `GpuBatchTransform`
    under ``data.gpu_decode``. The model is left in eval mode.
    """
    from tqdm.auto import tqdm

    device = dist_info.device
    num_classes = model.num_classes
    sampler = ShardSampler(len(data.test), dist_info.world_size, dist_info.rank)
    test_set = tte_dataset(data.test, cfg.eval.tte, image_size)  # eval.tte: n crops per image
    loader = build_loader(test_set, cfg.train.eval_batch_size, sampler, _no_persist(cfg.data),
                          cfg.data.pin_memory and device.type == "cuda", train=False)
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    skipped = torch.zeros(1, dtype=torch.float64, device=device)
    model.eval()
    t0, n = time.perf_counter(), 0
    bar = tqdm(loader, disable=not progress, desc="eval", unit="batch", dynamic_ncols=True)
    for batch in bar:
        skipped += batch.skipped
        images, labels = batch_on_device(batch, device, gpu_transform)
        if images is None:
            continue
        with autocast(device, cfg.train.amp):
            pred = tte_logits(model, images).argmax(dim=-1)
        total += torch.bincount(labels, minlength=num_classes).double()
        correct += torch.bincount(labels[pred == labels], minlength=num_classes).double()
        n += len(labels)
        bar.set_postfix(img_s=f"{n / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    if dist_info.distributed:
        for t in (correct, total, skipped):
            dist.all_reduce(t)
    report = accuracy_report(correct, total, data.group_counts)
    report["skipped"] = int(skipped.item())
    return report
