"""``python -m luna_shm`` / ``luna-shm``: the command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse argv and run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="luna-shm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="write, read back and verify one utterance, with timings")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from luna_shm import demo

        return demo.run(sys.stdout)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
