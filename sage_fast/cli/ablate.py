"""`sage-fast ablate`: the component ladder of the paper's Tables 5 and 6, one training run per row."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import OVERRIDE_HELP, CommandError, CommandParser, add_config_arguments, split_arguments
from .train import training_outcomes


def main(argv) -> int:
    from ..training import ablate
    from ..training.distributed import is_main_process

    doc = ablate.__doc__
    p = CommandParser(prog="sage-fast ablate", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="The c" + doc.splitlines()[0].split(": the c", 1)[1] + "\n\n" + doc.split("\n\n", 1)[1],
                      epilog=OVERRIDE_HELP,
                      usage="%(prog)s [--preset P | --config C] [overrides] [--rows ROW [ROW ...]] [--dry-run]")
    add_config_arguments(p, "YAML run config (sections data, model, optim, train, eval)")
    p.add_argument("--rows", nargs="+", metavar="ROW",
                   help="rows to run, by name or number: " + ", ".join(f"{i} {r.name}" for i, r in
                                                                     enumerate(ablate.LADDER)) + " (default: all)")
    p.add_argument("--dry-run", action="store_true", help="list the rows, their folders and which are finished; "
                                                          "train nothing")
    args, rest = p.parse_known_args(argv)
    names = list(args.rows or [])
    # --rows takes every later word: overrides written after it are handed back
    rest = [n for n in names if "=" in n] + rest
    names = [n for n in names if "=" not in n]
    if args.rows is not None and not names:
        raise CommandError(p.prog, "--rows names no row; rows: " + ", ".join(r.name for r in ablate.LADDER))
    overrides = split_arguments(rest)[0]
    unknown = [a for a in overrides if "=" not in a]
    if unknown:
        raise CommandError(p.prog, f"unrecognized arguments: {' '.join(unknown)} (overrides are section.key=value; "
                                   f"see {p.prog} --help)")
    # user errors (a bad row, config or path) are printed as one line by the command line's `main`
    selected = ablate.select_rows(names)
    base, planned = ablate.plan_ablation(args.config, overrides, args.preset)
    out_dir = Path(base.train.output_dir)
    if args.dry_run:
        identities: dict = {}
        finished = {i for i in selected
                    if ablate.row_report(planned[i], identities) is not None}
        lines = [[str(planned[i].index), planned[i].row.name, " ".join(ablate.row_overrides(planned[i].row)),
                  str(planned[i].folder), "finished" if i in finished else "to run"]
                 for i in selected]
        widths = [max(len(line[c]) for line in lines) for c in range(4)]
        for line in lines:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths + [0])).rstrip())
        return 0
    with training_outcomes(p.prog):
        done = ablate.run_ablation(base, planned, selected)
    if is_main_process():
        print()
        print(ablate.markdown_table(ablate.table_rows([(d[0], d[1]) for d in done])), end="")
        evaluated = sum(s == "evaluated" for _, _, s in done)
        trained = sum(s not in ("reused", "evaluated") for _, _, s in done)
        zero_shot = f", {evaluated} evaluated (zero-shot)" if evaluated else ""
        print(f"{len(done)} rows ({trained} trained{zero_shot}, {len(done) - trained - evaluated} finished earlier); "
              f"{out_dir / 'ablation.md'}, {out_dir / 'ablation.csv'}")
    return 0
