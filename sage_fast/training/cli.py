"""The `sage-fast` command: `sage-fast demo`, `train`, `eval`, `predict`, `attention`, `sweep` (see `COMMANDS`)."""
from __future__ import annotations

import argparse
import json
import sys


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


def _train(argv):
    from .config import PRESETS, ConfigError, build_config

    p = argparse.ArgumentParser(prog="sage-fast train", allow_abbrev=False, epilog=_OVERRIDE_HELP,
                                description="Train Sage (single process, or under torchrun for several GPUs / nodes).")
    p.add_argument("--config", help="YAML run config (sections data, model, optim, train; optional 'preset')")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a row of the paper's Table 8")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue from CKPT; without a value from OUTPUT_DIR/last.pt; 'auto': resume if it exists")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--bench-data", type=int, metavar="N", help="only measure the input pipeline over N batches")
    args, rest = p.parse_known_args(argv)
    if args.resume and "=" in args.resume and not args.resume.endswith(".pt"):
        # `--resume optim.lr=0.1`: argparse took the override as the optional value
        rest, args.resume = [args.resume] + rest, "last"
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

    from .loop import train
    from .metrics import format_report

    resume = args.resume
    if resume == "last":
        resume = str(Path(cfg.train.output_dir) / "last.pt")
    if resume and resume != "auto" and not Path(resume).is_file():
        p.error(f"checkpoint to resume from not found: {resume} (--resume auto starts from scratch when "
                "there is none)")
    report = train(cfg, resume=resume)
    if report is not None:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(format_report(report))
            print(f"outputs in {cfg.train.output_dir}")
    return 0


def _eval(argv):
    from .config import PRESETS, ConfigError, build_config

    p = argparse.ArgumentParser(prog="sage-fast eval", allow_abbrev=False, epilog=_OVERRIDE_HELP,
                                description="Evaluate trained Sage weights: overall / many / medium / few top-1, "
                                            "per-class accuracy (CSV) and plot, written to train.output_dir.")
    p.add_argument("--weights", required=True, help="adapters.safetensors or a checkpoint (last.pt)")
    p.add_argument("--config", help="YAML run config; default: the config stored with the weights")
    p.add_argument("--preset", choices=sorted(PRESETS))
    args, rest = p.parse_known_args(argv)
    from .checkpoint import config_from_weights
    from .loop import evaluate_weights
    from .metrics import format_report

    try:
        base = None if (args.config or args.preset) else config_from_weights(args.weights)
        cfg = build_config(args.config, _split_overrides(rest), preset=args.preset, base=base)
    except ConfigError as e:
        p.error(str(e))
    except FileNotFoundError as e:
        p.error(str(e))
    report = evaluate_weights(cfg, args.weights)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
        print(json.dumps({k: report[k] for k in ("overall", "many", "medium", "few")}))
    return 0


def _prepare(argv):
    import os

    from .config import PRESETS, ConfigError, build_config
    from .data.prepare import DEFAULT_QUALITY, DEFAULT_SHARD_MB, DEFAULT_SHORT_SIDE, format_summary, prepare

    p = argparse.ArgumentParser(
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
    parser = argparse.ArgumentParser(prog="sage-fast", description="Sage on CLIP for long-tailed recognition",
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
