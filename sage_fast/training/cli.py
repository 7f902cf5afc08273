"""The `sage-fast` command: `sage-fast demo`, `train`, `eval`, `predict`, `attention`, `sweep` (see `COMMANDS`)."""
from __future__ import annotations

import json
import sys

from .errors import CommandParser

#: `sage-fast train` after SIGTERM / SIGUSR1: EX_TEMPFAIL, "try again" (see _TRAIN_EXIT_HELP)
EXIT_PREEMPTED = 75


def _demo(argv):
    from .demo import main as demo_main

    return demo_main(argv)


def _split_overrides(rest):
    """Leftover arguments -> ``key=value`` overrides; ``--key value`` is accepted as ``key=value``."""
    out, i = [], 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--") and "=" not in tok and i + 1 < len(rest):
            out.append(f"{tok[2:]}={rest[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


_OVERRIDE_HELP = ("overrides: any config key as section.key=value (or --section.key value), e.g. optim.lr=0.02 "
                  "data.root=/data/ImageNet_LT data.num_workers=16; values are parsed as YAML. "
                  "Print the full config with --print-config.")


_TRAIN_EXIT_HELP = (
    "Exit status: 0 finished; 1 crashed; 2 refused before training: bad arguments or config, an OUTPUT_DIR "
    "that already holds a run (without --resume / --overwrite), resume settings that differ from the "
    "checkpoint's (without --force-resume), no checkpoint that verifies; 3 diverged: the weights went NaN/Inf, "
    "nothing non-finite was saved, the message names the step and the last good checkpoint; "
    f"{EXIT_PREEMPTED} preempted: SIGTERM or SIGUSR1 stopped the run after a whole step with a checkpoint written "
    "(every rank under torchrun, which itself then exits 1 and reports 'exitcode: 75'): resubmit with --resume "
    "(or --resume auto) to continue exactly.")


def _fail(prog: str, e: BaseException, code: int, every_rank: bool = False) -> int:
    """One line on stderr (rank 0 only, unless `every_rank`: a line that differs per rank) and the exit code."""
    import os

    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        kind = "stopped" if code == EXIT_PREEMPTED else "error"
        print(f"sage-fast: {kind}: {prog}: {e}", file=sys.stderr, flush=True)
    return code


def _train(argv):
    from .config import PRESETS, ConfigError, build_config

    p = CommandParser(prog="sage-fast train", allow_abbrev=False,
                                epilog=_OVERRIDE_HELP + " " + _TRAIN_EXIT_HELP,
                                description="Train Sage (single process, or under torchrun for several GPUs / nodes).")
    p.add_argument("--config", help="YAML run config (sections data, model, optim, train; optional 'preset')")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a row of the paper's Table 8")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue from CKPT; without a value from OUTPUT_DIR/last.pt (previous.pt when last.pt is "
                        "corrupt); 'auto': resume if there is a checkpoint, else start fresh")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch in an OUTPUT_DIR that holds a run, deleting that run's checkpoints, "
                        "logs, reports and export first (without it such a folder is refused)")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even though settings that change the result (seed, data, model, optim, ...) differ "
                        "from the checkpoint's; the result then differs from an uninterrupted run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--bench-data", type=int, metavar="N", help="only measure the input pipeline over N batches")
    args, rest = p.parse_known_args(argv)
    if args.resume and "=" in args.resume and not args.resume.endswith(".pt"):
        # `--resume optim.lr=0.1`: argparse took the override as the optional value
        rest, args.resume = [args.resume] + rest, "last"
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    try:
        cfg = build_config(args.config, _split_overrides(rest), preset=args.preset)
    except ConfigError as e:
        p.error(str(e))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.bench_data:
        from .loop import bench_input_pipeline

        r = bench_input_pipeline(cfg, args.bench_data)
        print(f"input pipeline: {r['images_per_s']:.1f} images/s ({r['images']} images, {r['batches']} batches of "
              f"{cfg.optim.batch_size}, {cfg.data.num_workers} workers, {r['skipped']} skipped)")
        return 0
    from pathlib import Path

    from .checkpoint import RunFolderError, resume_candidates
    from .loop import Diverged, Preempted, train
    from .metrics import format_report

    resume = args.resume
    if resume == "last":
        resume = str(Path(cfg.train.output_dir) / "last.pt")
    if resume and resume != "auto" and not any(c.is_file() for c in resume_candidates(resume)):
        p.error(f"checkpoint to resume from not found: {resume} (--resume auto starts from scratch when "
                "there is none)")
    try:
        report = train(cfg, resume=resume, overwrite=args.overwrite, force_resume=args.force_resume)
    except RunFolderError as e:
        return _fail(p.prog, e, 2)
    except Diverged as e:
        return _fail(p.prog, e, Diverged.exit_code)
    except Preempted as e:
        return _fail(p.prog, e, EXIT_PREEMPTED, every_rank=True)
    if report is not None:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(format_report(report))
            print(f"outputs in {cfg.train.output_dir}")
    return 0


def _eval(argv):
    from .config import PRESETS

    p = CommandParser(prog="sage-fast eval", allow_abbrev=False,
                                epilog=_OVERRIDE_HELP + " Exit status: 0 done; 1 crashed; 2 bad arguments or config, "
                                       "weights that are corrupt (checksum mismatch) or unreadable.",
                                description="Evaluate trained Sage weights: overall / many / medium / few top-1, "
                                            "per-class accuracy (CSV) and plot, written to their own folder "
                                            "(--out; never over the training run's reports); the last line "
                                            "printed is JSON (null for a group without classes).")
    p.add_argument("--weights", required=True, help="adapters.safetensors or a checkpoint (last.pt); verified "
                                                    "against the checksum stored in it")
    p.add_argument("--config", help="YAML run config; default: the config stored with the weights")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--out", metavar="DIR", help="folder for metrics.json, per_class.csv and "
                                                "per_class_accuracy.png (default: OUTPUT_DIR/eval)")
    args, rest = p.parse_known_args(argv)
    from .checkpoint import RunFolderError
    from .loop import evaluate_weights
    from .metrics import format_report, json_safe
    from .predict import resolve_run_config

    # a bad config, a missing file: user errors, printed as one line by `main`
    try:
        cfg = resolve_run_config(args.weights, args.config, _split_overrides(rest), args.preset)
        report = evaluate_weights(cfg, args.weights, out_dir=args.out)
    except RunFolderError as e:
        return _fail(p.prog, e, 2)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
        print(json.dumps(json_safe({k: report[k] for k in ("overall", "many", "medium", "few")}), allow_nan=False))
    return 0


def _prepare(argv):
    import os

    from .config import PRESETS, ConfigError, build_config
    from .data.prepare import DEFAULT_QUALITY, DEFAULT_SHARD_MB, DEFAULT_SHORT_SIDE, format_summary, prepare

    p = CommandParser(
        prog="sage-fast prepare", allow_abbrev=False, epilog=_OVERRIDE_HELP,
        description="Decode, check and resize every image of both splits once, into tar shards (webdataset "
                    "layout: KEY.jpg + KEY.cls) and DIR/manifest.json; train and evaluate on them with "
                    "data.prepared=DIR. Run the same command again to resume an interrupted preparation.")
    p.add_argument("--config", help="YAML run config (its data section names the data set)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a row of the paper's Table 8")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and manifest.json")
    p.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE, metavar="N",
                   help=f"resize so the short side is N px, never enlarging (default {DEFAULT_SHORT_SIDE}: "
                        "headroom for RandomResizedCrop at 224 px); 0 keeps the original size")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                   help=f"JPEG quality of re-encoded images, 1..95 (default {DEFAULT_QUALITY})")
    p.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_MB, metavar="MB",
                   help=f"target shard size in MiB (default {DEFAULT_SHARD_MB:g})")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes (default: all CPU cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = build_config(args.config, _split_overrides(rest), preset=args.preset)
    except ConfigError as e:
        p.error(str(e))
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    summary = prepare(cfg.data, args.out, short_side=args.short_side, quality=args.quality,
                      shard_mb=args.shard_size, workers=args.workers, progress=not args.no_progress)
    if not summary["done_before"]:
        print(format_summary(summary))
    return 0


def _predict(argv):
    from .predict import main as predict_main

    return predict_main(argv)


def _attention(argv):
    from .attention_maps import main as attention_main

    return attention_main(argv)


def _sweep(argv):
    from .sweep import main as sweep_main

    return sweep_main(argv)


def _ablate(argv):
    from .ablate import main as ablate_main

    return ablate_main(argv)


COMMANDS = {
    "demo": (_demo, "train Sage on a tiny generated long-tailed data set, on CPU, in about a minute"),
    "train": (_train, "train Sage from a config / preset (torchrun for several GPUs or nodes)"),
    "eval": (_eval, "evaluate trained weights: overall, many, medium, few and per-class top-1"),
    "prepare": (_prepare, "decode, check and resize a data set once into tar shards + manifest "
                          "(data.prepared)"),
    "predict": (_predict, "top-k classes and probabilities of images (files or folders), as a table or JSON"),
    "attention": (_attention, "class-token attention maps of zero-shot CLIP and the fine-tuned model, as a PNG"),
    "sweep": (_sweep, "one training run per value of one or two config keys; sweep.csv and sweep.png"),
    "ablate": (_ablate, "the component ladder of Tables 5 and 6 (baseline, +SG, +Init, +CF, +FIT), one run per "
                        "row; ablation.md and ablation.csv"),
}


TRACEBACK_ENV = "SAGE_FAST_TRACEBACK"


def main(argv=None) -> int:
    """Run a command. A user error (`sage_fast.training.errors`) ends as one line on stderr and status 2;
    its traceback only with ``--traceback`` (anywhere on the command line) or ``SAGE_FAST_TRACEBACK=1``."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    # taken out before the commands parse: their leftover arguments are config overrides
    show_traceback = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    parser = CommandParser(prog="sage-fast", description="Sage on CLIP for long-tailed recognition",
                                     epilog="Mistakes in the config, paths or files end in one line "
                                            "'sage-fast: error: ...' (exit status 2); add --traceback, or set "
                                            f"{TRACEBACK_ENV}=1, to see where they were raised.")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    parser.add_argument("--traceback", action="store_true", help="print the traceback of a user error too")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    try:
        return int(COMMANDS[args.command][0](argv[1:]) or 0)
    except Exception as e:  # noqa: BLE001 - only user errors are caught; anything else is re-raised below
        from .errors import user_error_message

        message = user_error_message(e)
        if message is None:
            raise
        if show_traceback:
            import traceback

            traceback.print_exc()
        print(f"sage-fast: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
