"""requirements.lock read as data: its pins, and what moved between two locks.

python tests/lockfile.py diff requirements.lock .cache/requirements-latest.txt   # `make test-latest` prints it
"""

import re
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")


def read_pins(path: str | Path) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line of a pip requirements file."""
    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: {line!r} is not a name==version pin; regenerate it with `make lock`.")
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def installed_unlike(path: str | Path) -> list[str]:
    """One line per package of the lock that this environment lacks or holds at another version."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = []
    for name, pinned in read_pins(path).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            wrong.append(f"{name}: locked {pinned}, installed {installed}")
    return wrong


def moved(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per package whose pin differs, appeared or went away."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name, "-"), new.get(name, "-")
        if before != after:
            lines.append(f"{name}: {before} -> {after}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "diff":
        print("usage: python tests/lockfile.py diff OLD_LOCK NEW_LOCK", file=sys.stderr)
        return 2
    lines = moved(read_pins(argv[1]), read_pins(argv[2]))
    print(f"{len(lines)} package(s) newer than {argv[1]} (or added or removed):" if lines else f"{argv[2]} = {argv[1]}")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
