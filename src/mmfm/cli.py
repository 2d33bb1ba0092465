"""The ``mmfm`` command: one subcommand per stage (``mmfm <stage> --help``).

Commands that report numbers accept ``--json`` and then print exactly one JSON object as their last
line of standard output, for scripts and the workflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _toy_r10(args: argparse.Namespace) -> int:
    from mmfm.toy import r10

    cfg = r10.R10Config(seed=args.seed, iters=args.iters, n_eval=args.n_eval, steps=args.steps, batch=args.batch)
    rows = r10.run(cfg, progress=not args.json)
    paths = r10.write_outputs(rows, cfg, Path(args.out))
    checks = r10.claims(rows)
    if args.json:
        print(json.dumps({"rows": rows, "claims": checks, "files": {k: str(v) for k, v in paths.items()}}))
    else:
        print(r10.format_table(rows))
        for setting, c in checks.items():
            print(f"{setting}: Len(GMM/mode) is {100 * c['len_reduction_vs_gauss_indep']:.1f}% below "
                  f"Gaussian/independent; paper's claims {'hold' if c['holds'] else 'DO NOT hold'}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    toy = sub.add_parser("toy", help="the paper's toy experiments").add_subparsers(
        dest="toy", required=True, metavar="experiment")
    r10 = toy.add_parser("r10", help="R^10 Compact/Spread table: Len and W2^2 for three source/coupling settings",
                         description="Train Gaussian/independent, GMM/independent and GMM/mode flows on the "
                                     "Compact and Spread targets in R^10; print Len and exact W2^2 beside the "
                                     "paper's numbers; write JSON, CSV and a plot.")
    r10.add_argument("--out", default="results/toy_r10", help="output folder (default: %(default)s)")
    r10.add_argument("--seed", type=int, default=0)
    r10.add_argument("--iters", type=int, default=3000, help="training steps per setting (default: %(default)s)")
    r10.add_argument("--batch", type=int, default=512)
    r10.add_argument("--n-eval", type=int, default=3000, help="samples for Len and W2^2 (default: %(default)s)")
    r10.add_argument("--steps", type=int, default=100, help="midpoint steps of the evaluation ODE")
    r10.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    r10.set_defaults(func=_toy_r10)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"mmfm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
