"""The environment `make` builds is the lock, and the lock meets pyproject.toml's ranges.

`make test-latest` leaves this file out: its environment is the newest releases, not the lock.
"""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from lockfile import installed_unlike, moved, read_pins
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def makefile_value(name: str) -> str:
    match = re.search(rf"^{name} := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"the Makefile has no `{name} := ...` line"
    return match[1].strip()


def locked_requirements() -> list[Requirement]:
    """What the lock resolves: the Makefile's extras of pyproject.toml, and lmms-eval-cpu.txt."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = makefile_value("EXTRAS").split()
    strings = list(project["dependencies"])
    for extra in extras:
        strings += project["optional-dependencies"][extra]
    lines = (ROOT / "lmms-eval-cpu.txt").read_text().splitlines()
    strings += [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    requirements = []
    for string in strings:
        requirement = Requirement(string)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra}) for extra in extras):
            requirements.append(requirement)
    return requirements


def test_every_locked_package_is_installed_at_its_pin():
    wrong = installed_unlike(LOCK)
    assert not wrong, "the venv is not the lock (rm -rf .venv and run make again):\n" + "\n".join(wrong)


def test_the_lock_meets_pyproject_ranges():
    pins = read_pins(LOCK)
    unmet = []
    for requirement in locked_requirements():
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or not requirement.specifier.contains(Version(pinned), prereleases=True):
            unmet.append(f"{requirement} (locked: {pinned})")
    assert not unmet, "requirements.lock is older than pyproject.toml; run make lock:\n" + "\n".join(unmet)


def test_lmms_eval_is_pinned_and_installed():
    name, pinned = makefile_value("LMMS_EVAL").split("==")
    assert version(name) == pinned


def test_read_pins_refuses_a_line_that_is_no_pin(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nrequests==2.0\n    # via x\ntorch>=2\n")
    with pytest.raises(ValueError, match=r"requirements.lock:4: 'torch>=2' is not a name==version pin"):
        read_pins(lock)


def test_moved_names_each_change():
    old = {"transformers": "5.24.0", "torch": "2.13.0+cpu", "gone": "1"}
    new = {"transformers": "5.25.0", "torch": "2.13.0+cpu", "added": "2"}
    assert moved(old, new) == ["added: - -> 2", "gone: 1 -> -", "transformers: 5.24.0 -> 5.25.0"]
