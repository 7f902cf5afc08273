"""The `sage-fast` command: `sage-fast demo`, `sage-fast train`, `sage-fast eval`."""
from __future__ import annotations

import argparse
import json
import sys

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
        print(f"{prog}: {kind}: {e}", file=sys.stderr, flush=True)
    return code


def _train(argv):
    from .config import PRESETS, ConfigError, build_config

    p = argparse.ArgumentParser(prog="sage-fast train", allow_abbrev=False,
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
    from .config import PRESETS, ConfigError, build_config

    p = argparse.ArgumentParser(prog="sage-fast eval", allow_abbrev=False,
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
    from .checkpoint import RunFolderError, config_from_weights
    from .loop import evaluate_weights
    from .metrics import format_report, json_safe

    try:
        base = None if (args.config or args.preset) else config_from_weights(args.weights)
        cfg = build_config(args.config, _split_overrides(rest), preset=args.preset, base=base)
    except ConfigError as e:
        p.error(str(e))
    except FileNotFoundError as e:
        p.error(str(e))
    except RunFolderError as e:
        return _fail(p.prog, e, 2)
    try:
        report = evaluate_weights(cfg, args.weights, out_dir=args.out)
    except RunFolderError as e:
        return _fail(p.prog, e, 2)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
        print(json.dumps(json_safe({k: report[k] for k in ("overall", "many", "medium", "few")}), allow_nan=False))
    return 0


COMMANDS = {
    "demo": (_demo, "train Sage on a tiny generated long-tailed data set, on CPU, in about a minute"),
    "train": (_train, "train Sage from a config / preset (torchrun for several GPUs or nodes)"),
    "eval": (_eval, "evaluate trained weights: overall, many, medium, few and per-class top-1"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sage-fast", description="Sage on CLIP for long-tailed recognition")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    return int(COMMANDS[args.command][0](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
