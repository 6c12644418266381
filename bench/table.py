"""What the benches share: percentiles, and the rows they print (measure | value | note) with the load at the end."""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

WAIT_S = 600.0
"""How long a bench waits for one execution to end before it fails (a stuck bench must not hang for ever)."""


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def print_rows(rows: List[Tuple[str, str, str]]) -> None:
    """Prints `rows` as an aligned table, then the 1-minute load average."""
    rows = [
        *rows,
        ("load average (1 min) at the end", open("/proc/loadavg").read().split()[0], f"{os.cpu_count()} cores"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(w)} | value | note")
    for name, value, note in rows:
        print(f"{name.ljust(w)} | {value} | {note}")
