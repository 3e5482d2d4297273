"""Progress on stderr for long steps; silent under --quiet / --json so stdout stays machine-readable."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def step(self, message: str) -> None:
        if self.enabled:
            print(f"vitexport: {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, desc: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """Yields tick(n). Bars with no total appear only once something ticks."""
        if not self.enabled:
            yield lambda n=1: None
            return
        try:
            from tqdm import tqdm
        except ImportError:  # a runtime-only install on a device (the README's minimum): steps, no bars
            self.step(desc)
            yield lambda n=1: None
            return

        state: dict[str, tqdm] = {}

        def tick(n: int = 1) -> None:
            if "bar" not in state:
                state["bar"] = tqdm(total=total, desc=desc, unit="img", file=self.stream, leave=False, dynamic_ncols=True)
            state["bar"].update(n)

        try:
            yield tick
        finally:
            if "bar" in state:
                state["bar"].close()
