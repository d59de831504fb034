"""The ``ibnorm`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "speed and memory of IB layers vs the torch parents (CSV, PNG, table)"}
    parser = argparse.ArgumentParser(prog="ibnorm", description="IBNorm for PyTorch")
    parser.add_argument("command", choices=sorted(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items()))
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        from .benchmark import main as bench

        bench(argv[1:])


if __name__ == "__main__":
    main()
