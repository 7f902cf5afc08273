"""`sage-fast info`: what this installation runs on this machine, and why: the first thing to paste into a
bug report.

Versions (sage_fast, Python, torch, Triton, open_clip, xformers, CUDA), the device and its compute
capability, for each op (adapter, loss) and for the attention the backend that the given setting
("auto" unless ``--backend`` / ``--attention`` say otherwise) takes here and why, the kernels' self-check
on this device (it runs here, on a GPU), and on CUDA a speed ratio of the fused kernels against the
PyTorch path at one small shape (a few seconds; ``--no-speed`` skips it). ``--json`` prints the same as
JSON.
"""
from __future__ import annotations

import argparse
import json

from .common import CommandParser


def main(argv) -> int:
    from ..model.attention import ATTENTION_BACKENDS
    from ..model.runtime import environment_report, format_environment
    from ..ops.backend import BACKENDS

    p = CommandParser(prog="sage-fast info", allow_abbrev=False, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="the device to report on (default: the current GPU, else the CPU)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="the model.backend to explain (default auto)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                   help="the model.attention to explain (default auto)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed probe (CUDA only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    report = environment_report(args.device, backend=args.backend, attention=args.attention,
                                speed=not args.no_speed)
    print(json.dumps(report, indent=2) if args.json else format_environment(report))
    return 0


def version_line() -> str:
    """``sage-fast X (torch Y, triton Z, open_clip W)``."""
    from ..model.runtime import versions

    v = versions()
    deps = ", ".join(f"{k} {v[k] or 'not installed'}" for k in ("torch", "triton", "open_clip"))
    return f"sage-fast {v['sage_fast']} ({deps})"
