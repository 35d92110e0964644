"""``python -m luna_shm`` / ``luna-shm``: the command line (see :mod:`luna_shm.cli`)."""

from __future__ import annotations

import sys as _sys

from luna_shm.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    _sys.exit(main())
