"""The rows a bench prints (measure | value | note), with the load at the end: medians mean little without it."""

from __future__ import annotations

import os
from typing import List, Tuple


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
