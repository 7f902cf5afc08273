"""`sage-fast train`: train Sage from a config / preset, one process or under torchrun."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .common import OVERRIDE_HELP, PRINT_CONFIG_HELP, CommandError, CommandParser, add_config_arguments, split_arguments

#: after SIGTERM / SIGUSR1: EX_TEMPFAIL, "try again" (`sage_fast.training.preemption.Preempted`)
EXIT_PREEMPTED = 75
#: the weights went NaN / Inf (`sage_fast.training.trainer.Diverged`)
EXIT_DIVERGED = 3

EXIT_HELP = (
    "Exit status: 0 finished (or, with --resume, already finished before: nothing is done); 1 crashed; 2 refused "
    "before training: bad arguments or config, an OUTPUT_DIR that another process is writing into (its lock "
    "names it), that holds files not of a sage-fast run, or that already holds a run (without --resume / "
    "--overwrite), resume settings that differ from the checkpoint's (without --force-resume, or ones it cannot "
    "force), other classes than the checkpoint's, no checkpoint that verifies; 3 diverged: the loss, logits or weights went NaN/Inf, "
    "nothing non-finite was saved, the message names the step and the last good checkpoint; "
    f"{EXIT_PREEMPTED} preempted: SIGTERM or SIGUSR1 stopped the run after a whole step with a checkpoint written "
    "(every rank under torchrun, which itself then exits 1 and reports 'exitcode: 75'), or before the first step "
    "with nothing to save: resubmit with --resume (or --resume auto) to continue exactly; 130 the same after "
    "SIGINT (Ctrl-C; a second one stops at once, without a checkpoint of the step under way).")


def main(argv) -> int:
    from ..training.config import ConfigError, build_config

    p = CommandParser(prog="sage-fast train", allow_abbrev=False,
                      epilog=" ".join((OVERRIDE_HELP, PRINT_CONFIG_HELP, EXIT_HELP)),
                      description="Train Sage (single process, or under torchrun for several GPUs / nodes).")
    add_config_arguments(p)
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue from CKPT; without a value from OUTPUT_DIR/last.pt (previous.pt when last.pt is "
                        "corrupt); 'auto': resume if there is a checkpoint, else start fresh")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch in an OUTPUT_DIR that holds a run, deleting that run's checkpoints, "
                        "logs, reports and export first (without it such a folder is refused); files that are not "
                        "a sage-fast run's are never deleted: such a folder is always refused")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even though settings that change the result (optim.lr, momentum, weight decay, "
                        "loss and adapter hyperparameters, data, ...) differ from the checkpoint's: they apply from "
                        "its step on, so the result differs from an uninterrupted run; optim.epochs, batch_size, "
                        "schedule, train.seed and the model's structure cannot differ")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--bench-data", type=int, metavar="N", help="only measure the input pipeline over N batches")
    args, rest = p.parse_known_args(argv)
    if args.resume and "=" in args.resume and not os.path.isfile(args.resume):
        # `--resume optim.lr=0.1`: argparse took the override as the optional value (a checkpoint file whose
        # name holds "=" stays the checkpoint)
        rest, args.resume = [args.resume] + rest, "last"
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    try:
        cfg = build_config(args.config, split_arguments(rest)[0], preset=args.preset)
    except ConfigError as e:
        p.error(str(e))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.bench_data:
        return _bench_data(cfg, args.bench_data)

    from ..training.checkpoint import resume_candidates
    from ..training.distributed import is_main_process
    from ..training.metrics import format_report
    from ..training.run_folder import LAST
    from ..training.trainer import train

    resume = args.resume
    if resume == "last":
        resume = str(Path(cfg.train.output_dir) / LAST)
    if resume and resume != "auto" and not any(c.is_file() for c in resume_candidates(resume)):
        p.error(f"checkpoint to resume from not found: {resume} (--resume auto starts from scratch when "
                "there is none)")
    with training_outcomes(p.prog):
        report = train(cfg, resume=resume, overwrite=args.overwrite, force_resume=args.force_resume)
    if report is not None and is_main_process():
        if report.get("done_before"):
            print(f"{p.prog}: {cfg.train.output_dir} already finished ({report.get('epoch')} epochs, step "
                  f"{report.get('step')}): nothing to do; its metrics are in "
                  f"{Path(cfg.train.output_dir) / 'metrics.json'}"
                  + ("; --force-resume changes nothing in a finished run (other settings: a new run, with "
                     "--overwrite or another train.output_dir)" if args.force_resume else ""))
            return 0
        print(format_report(report))
        print(f"outputs in {cfg.train.output_dir}")
    return 0


@contextlib.contextmanager
def training_outcomes(prog: str):
    """How a command that trains ends when training does not finish: a refused run folder or checkpoint
    (one line, status 2), a diverged run (3), a preempted one (on every rank: 75 after SIGTERM / SIGUSR1, 130
    after SIGINT)."""
    from ..training.preemption import Preempted
    from ..training.run_folder import RunFolderError
    from ..training.trainer import Diverged

    try:
        yield
    except RunFolderError as e:
        raise CommandError(prog, e) from None
    except Diverged as e:
        raise CommandError(prog, e, EXIT_DIVERGED) from None
    except Preempted as e:
        raise CommandError(prog, e, e.exit_code, kind="stopped", every_rank=True) from None


def _bench_data(cfg, batches: int) -> int:
    from ..training.data import bench_input_pipeline, build_data
    from ..training.preflight import check_image_size

    data = build_data(cfg.data, check_image_size(cfg), raw=cfg.data.gpu_decode)
    r = bench_input_pipeline(data, cfg.optim.batch_size, cfg.data, cfg.train.seed, batches)
    print(f"input pipeline: {r['images_per_s']:.1f} images/s ({r['images']} images, {r['batches']} batches of "
          f"{cfg.optim.batch_size}, {cfg.data.num_workers} workers, {r['skipped']} skipped)")
    if cfg.data.gpu_decode:
        print("gpu_decode: workers only read bytes here; decoding happens in the training step")
    return 0
