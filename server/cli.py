"""`ditserve` command line: tools around the engine (tiny models, ...)."""

from __future__ import annotations

import argparse
import sys

import torch
from engine import resolve_model
from engine.memory_report import format_report, memory_report
from engine.tiny_models import TINY_PREFIX, tiny_model_names, write_tiny_model


def _make_tiny(args: argparse.Namespace) -> None:
    path = write_tiny_model(args.name.removeprefix(TINY_PREFIX), args.directory)
    print(f"wrote tiny/{args.name.removeprefix(TINY_PREFIX)} to {path}")


def _memory(args: argparse.Namespace) -> None:
    model = resolve_model(args.model)
    ranks = memory_report(model, args.tensor_parallel_size, getattr(torch, args.dtype))
    print(format_report(model, args.tensor_parallel_size, args.dtype, ranks))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditserve", description="ditserve tools")
    commands = parser.add_subparsers(dest="command", required=True)
    make_tiny = commands.add_parser("make-tiny", help="write a built-in tiny model as a diffusers folder")
    make_tiny.add_argument("name", help=f"one of {', '.join(tiny_model_names())} (the tiny/ prefix is optional)")
    make_tiny.add_argument("directory", help="folder to write (created if missing)")
    make_tiny.set_defaults(run=_make_tiny)
    memory = commands.add_parser(
        "memory", help="per-rank parameter memory at a tensor-parallel size (from configs only)"
    )
    memory.add_argument("model", help="tiny/<family>, a diffusers folder (configs suffice) or a hub id")
    memory.add_argument("--tensor-parallel-size", type=int, default=1)
    memory.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    memory.set_defaults(run=_memory)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as exc:
        sys.exit(f"ditserve: error: {exc}")


if __name__ == "__main__":
    main()
