"""``python -m bench <name> [options]``; ``python -m bench all`` runs every benchmark.

Run from the repository root with the project's virtualenv and the ``bench`` extra
(``.venv/bin/pip install -e '.[bench]'``). Every benchmark prints a table and appends JSON
lines to the results file; ``--quick`` shrinks each one to a check that it works.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType

from .common import DEFAULT_RESULTS, Reporter

#: Benchmark name -> module (imported on use: ``overhead`` needs the ``bench`` extra).
BENCHMARKS = (
    "fill",
    "overhead",
    "quotas",
    "ratecap",
    "recovery",
    "rss",
    "history",
    "connections",
    "batch",
    "dashboard",
    "params",
    "dbcpu",
)


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help=f"JSON lines file to append to (default {DEFAULT_RESULTS})",
    )
    p.add_argument(
        "--quick", action="store_true", help="smaller sizes: a check that the benchmark works"
    )


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="name", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}
    for name in BENCHMARKS:
        module = _module(name)
        doc = module.__doc__ or name
        sp = sub.add_parser(
            name,
            help=doc.strip().splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(sp)
        module.add_arguments(sp)
        subs[name] = sp
    every = sub.add_parser("all", help="every benchmark with its defaults, one after the other")
    _common(every)
    return p, subs


def main(argv: list[str] | None = None) -> int:
    top, subs = parsers()
    args = top.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    reporter = Reporter(results=args.results)
    if args.name == "all":
        common = ["--results", str(args.results)] + (["--quick"] if args.quick else [])
        for name in BENCHMARKS:
            asyncio.run(_module(name).main(subs[name].parse_args(common), reporter))
    else:
        asyncio.run(_module(args.name).main(args, reporter))
    print(f"\nresults appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
