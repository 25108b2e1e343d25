"""Command line: ``python -m models --list`` prints every model with its parameter count."""

from __future__ import annotations

import argparse

import models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models",
        description="PipeDAP's model zoo. Parameters are counted on the meta device (no weights are allocated).",
    )
    parser.add_argument(
        "--list", action="store_true", help="print each model's kind, input and parameter count"
    )
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return
    print(f"{'model':<12} {'kind':<9} {'input':<14} {'classes/vocab':>13} {'parameters':>13}")
    for name in models.names():
        info = models.info(name)
        shape = "x".join(map(str, info.input_shape))
        count = models.count_parameters(name)
        print(
            f"{name:<12} {info.kind:<9} {shape:<14} {info.num_classes:>13,} {count:>13,}",
            flush=True,
        )


if __name__ == "__main__":
    main()
