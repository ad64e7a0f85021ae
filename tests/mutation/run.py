"""Mutation testing: each module against its own unit tests, with mutmut plus hand-written mutants.

Owns the list of targets (which module is judged by which test files), the scratch copies mutmut
works in, and the score line per target. It never edits the checkout: every mutant lives in a copy
under build/mutation/. The hand-written mutants (constants, flags, deleted calls that mutmut does
not generate) are in tests/mutation/hand_mutants.py; the survivors that cannot change behaviour are
listed, with reasons, in tests/mutation/equivalent.md and are counted as killed.

    python tests/mutation/run.py                   # every target
    python tests/mutation/run.py auth names        # some targets
    python tests/mutation/run.py --survivors store # also print each survivor's diff
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "build" / "mutation"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hand_mutants import HAND_MUTANTS  # type: ignore[import-not-found]  # noqa: E402


@dataclass(frozen=True)
class Target:
    sources: tuple[str, ...]
    tests: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "auth": Target(("rstash/auth.py",), ("tests/test_auth.py",)),
    "names": Target(("rstash/names.py",), ("tests/test_names.py",)),
    "wire": Target(
        (
            "rstash/wire/__init__.py",
            "rstash/wire/frames.py",
            "rstash/wire/events.py",
            "rstash/wire/replies.py",
            "rstash/wire/server.py",
            "rstash/wire/client.py",
        ),
        ("tests/wire",),
    ),
    "store": Target(("rstash/store.py", "rstash/upload.py"), ("tests/test_store*.py", "tests/test_upload*.py")),
}

MAX_CHILDREN = os.environ.get("RSTASH_MUTATION_CHILDREN", "2")
#: mutmut's verdicts that mean the tests noticed the mutant: they failed, or never finished.
DETECTED = frozenset({"killed", "timeout", "caught by type check", "segfault"})


def equivalent_names() -> set[str]:
    """Mutant names listed in equivalent.md (a line starting with `- \\`name\\``)."""
    text = (HERE / "equivalent.md").read_text(encoding="utf-8")
    return set(re.findall(r"^- `([^`]+)`", text, flags=re.MULTILINE))


def existing_tests(target: Target) -> list[str]:
    """The target's test files and directories (patterns expanded), as paths from the root."""
    return sorted({str(p.relative_to(ROOT)) for t in target.tests for p in ROOT.glob(t)})


def prepare(name: str, target: Target) -> Path:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "rstash", work / "rstash", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutation"))
    config = (
        "\n[tool.mutmut]\n"
        'source_paths = ["rstash"]\n'
        f"only_mutate = {json.dumps(list(target.sources))}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(existing_tests(target))}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not e2e"]\n'
    )
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8") + config)
    return work


def run_mutmut(name: str, target: Target) -> dict[str, str]:
    """Run mutmut in a fresh copy; return each mutant's status."""
    work = prepare(name, target)
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", MAX_CHILDREN], cwd=work, check=False,
                   stdout=subprocess.DEVNULL)
    out = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, check=True, capture_output=True,
                         text=True).stdout
    statuses = {}
    for line in out.splitlines():
        key, _, status = line.strip().rpartition(": ")
        if key:
            statuses[key] = status
    return statuses


def run_hand(name: str, target: Target) -> dict[str, str]:
    """Apply each hand-written mutant to a copy and run the target's tests; return each status."""
    statuses: dict[str, str] = {}
    work = WORK / f"{name}-hand"
    for mutant in HAND_MUTANTS:
        if mutant.path not in target.sources:
            continue
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(ROOT / "rstash", work / "rstash", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutation"))
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        source = work / mutant.path
        text = source.read_text(encoding="utf-8")
        if text.count(mutant.old) != 1:
            statuses[f"hand:{mutant.name}"] = "stale (the original text is not found exactly once)"
            continue
        source.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not e2e",
             "--timeout=120", *existing_tests(target)],
            cwd=work, env=env, capture_output=True, check=False,
        )
        statuses[f"hand:{mutant.name}"] = "killed" if proc.returncode not in (0, 5) else "survived"
    shutil.rmtree(work, ignore_errors=True)
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"some of: {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every survivor")
    args = parser.parse_args()
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    equivalent = equivalent_names()
    failed = False
    for name in names:
        target = TARGETS[name]
        started = time.monotonic()
        statuses = {**run_mutmut(name, target), **run_hand(name, target)}
        elapsed = time.monotonic() - started
        survivors = sorted(k for k, v in statuses.items() if v not in DETECTED and k not in equivalent)
        judged = [k for k, v in statuses.items() if not v.startswith("stale")]
        killed = len([k for k in judged if statuses[k] in DETECTED or k in equivalent])
        score = 100.0 * killed / len(judged) if judged else 0.0
        print(f"{name}: {score:.1f} % ({killed}/{len(judged)} killed or equivalent, "
              f"{len(survivors)} survivors) in {elapsed:.0f} s")
        for key in survivors:
            print(f"    {key}: {statuses[key]}")
            if args.survivors and not key.startswith("hand:"):
                diff = subprocess.run([sys.executable, "-m", "mutmut", "show", key], cwd=WORK / name,
                                      capture_output=True, text=True, check=False).stdout
                print("\n".join("        " + line for line in diff.splitlines()))
        failed = failed or score < 90.0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
