"""The `spo` command: one sub-command per verb, each defined in its own module.

Each verb module exposes `register(subparsers)`; heavy imports happen inside the verb's
handler, so `spo --help` is instant and a missing optional package only affects its verb.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import sys

from ..errors import SPOError

# verb modules, in the order `spo --help` lists them
VERB_MODULES = ["lora", "scorer", "score", "sample", "train", "demo", "ui"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spo",
        description="Step-by-step preference optimization for Stable Diffusion: LoRA tools, scorers, "
        "per-step resampling and preference training.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}_cmd":
                continue  # verb not built yet
            raise
        module.register(sub)
    return parser


def _tolerate_undecodable_paths() -> None:
    """Paths that are not valid UTF-8 reach Python as surrogate escapes; print them back as the
    bytes they were (as ls does) instead of failing on them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.fileno()  # a real file or terminal, not a capture buffer
            stream.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            pass


def main(argv: list[str] | None = None) -> int:
    _tolerate_undecodable_paths()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except SPOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an OS error no library call turned into an SPOError: still one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
