#!/usr/bin/env python3
"""Run the adversarial suite (tests/adversarial) and print its figures, one line per attack class.

The tests append their counts to a JSON-lines file named by ``RSTASH_ADV_FIGURES``; this script
points that at a fresh file, runs pytest on tests/adversarial with the interpreter it was started
with, sums the counts per class and prints::

    names N tried, 0 outside the box, 0 rule-breaking stored
    fuzz N, 0 unhandled, 0 stored, 0 temps left
    mitm N/N detected; 0 false successes reported by rstash-send
    faults K/K clean
    load 100/100 (inetd), 100/100 (listen)
    replay/forgery N/N refused
    wall time S s; pytest exit E

The exit status is pytest's. ``RSTASH_ADV_SCALE`` (0 < s <= 1) scales the counts down for a
quick local run; CI and the published figures use the full counts (no variable). Extra
arguments go to pytest (e.g. ``-x`` or ``-k names``). Run it as root with CI=true for the
end-to-end parts, as the e2e tests require (tests/e2e_support.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def summarise(rows: list[dict[str, int | str]]) -> list[str]:
    sums: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    loads: list[tuple[int, int, str]] = []
    for row in rows:
        figure = str(row["figure"])
        if figure == "load":
            loads.append((int(row["stored"]), int(row["senders"]), str(row.get("shape", "?"))))
            continue
        for k, v in row.items():
            if k != "figure":
                sums[figure][k] += int(v)
    out = []
    if "names" in sums:
        s = sums["names"]
        out.append(f"names {s['tried']} tried, {s['outside']} outside the box, "
                   f"{s['rule_breaking']} rule-breaking stored")
    if "fuzz" in sums:
        s = sums["fuzz"]
        out.append(f"fuzz {s['streams']}, {s['unhandled']} unhandled, {s['stored']} stored, "
                   f"{s['temps']} temps left")
    if "mitm" in sums:
        s = sums["mitm"]
        out.append(f"mitm {s['detected']}/{s['tried']} detected; {s['false_success']} false "
                   f"successes reported by rstash-send")
    if "faults" in sums:
        s = sums["faults"]
        out.append(f"faults {s['clean']}/{s['cases']} clean")
    if loads:
        out.append("load " + ", ".join(f"{a}/{b} ({shape})" for a, b, shape in loads))
    if "crypto" in sums:
        s = sums["crypto"]
        out.append(f"replay/forgery {s['refused']}/{s['tried']} refused")
    return out


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="rstash-adv-") as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = dict(os.environ, RSTASH_ADV_FIGURES=str(figures))
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "--timeout=900", "tests/adversarial", *argv],
                            cwd=CHECKOUT, env=env, check=False).returncode
        took = time.monotonic() - t0
        rows = [json.loads(x) for x in figures.read_text().splitlines()] \
            if figures.exists() else []
    print()
    scale = os.environ.get("RSTASH_ADV_SCALE")
    if scale:
        print(f"(counts scaled by RSTASH_ADV_SCALE={scale}; the published figures use none)")
    for line in summarise(rows):
        print(line)
    print(f"wall time {took:.0f} s; pytest exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
