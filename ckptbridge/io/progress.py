"""One progress bar, in bytes, on stderr: on for terminals, off otherwise."""

from __future__ import annotations

import sys
from typing import Any


class _Null:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar when ``enabled`` (None: only when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False, dynamic_ncols=True)
