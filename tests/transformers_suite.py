"""transformers' own common test suites, from the released sdist of the installed version.

Nothing of transformers' test code lives in this repository: `load()` downloads the sdist of the
installed transformers with pip (the registry is the only network this needs), unpacks its
`tests/` folder under `.cache/transformers-tests/<version>/` and caches it there.

The sdist ships `tests/test_*_common.py` but not the folders they import from:
`tests/generation/` (GenerationTesterMixin), `tests/exporters/` (ExportTesterMixin) and
`tests/utils/` (`config_common_kwargs`). No release on PyPI ships them (checked: 4.57.6, 5.0.0,
5.20.2, 5.22.2, 5.23.0, 5.24.0), so the generate tests cannot be run from a registry release.
`load()` writes empty stand-ins in their place, so that the common suites import; the tests that
need the real ones are not run, and the peer suite lists them among its skips.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "transformers-tests"
PACKAGE = "transformers_tests"  # the sdist's tests/, as an importable package
STAND_IN = '"""Stand-in written by aki\'s tests/transformers_suite.py: this file is not in the sdist."""\n\n'
STAND_INS = {
    "generation/test_utils.py": STAND_IN + "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": STAND_IN + "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": STAND_IN + "config_common_kwargs = {}\n",
}


class SuiteUnavailable(RuntimeError):
    """The sdist could not be fetched (no registry access) or lacks the common suites."""


def download_sdist(version: str, folder: Path) -> Path:
    # --no-binary for transformers only: its build requirements still come as wheels.
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "transformers"]
    # Few retries and a short timeout: without registry access the suite is skipped quickly.
    command += ["--disable-pip-version-check", "--retries", "1", "--timeout", "30"]
    command += ["-d", str(folder), f"transformers=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    archive = folder / f"transformers-{version}.tar.gz"
    if result.returncode != 0 or not archive.exists():
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SuiteUnavailable(f"pip could not download the transformers=={version} sdist: {last_line}")
    return archive


def load(version: str = transformers.__version__) -> Path:
    """The folder to put on sys.path to `import transformers_tests`; fetched once, then cached."""
    root = CACHE / version
    package = root / PACKAGE
    if (package / "test_modeling_common.py").exists():
        return root
    with tempfile.TemporaryDirectory() as scratch:
        archive = download_sdist(version, Path(scratch))
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archive) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not any(m.name.endswith("/test_modeling_common.py") for m in members):
                raise SuiteUnavailable(f"The transformers=={version} sdist holds no tests/test_modeling_common.py.")
            staging = Path(scratch) / PACKAGE
            for member in members:
                target = staging / member.name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(sdist.extractfile(member).read())
        (staging / "__init__.py").touch()
        for path, text in STAND_INS.items():
            stand_in = staging / path
            if not stand_in.exists():
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                (stand_in.parent / "__init__.py").touch()
                stand_in.write_text(text)
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, package)  # last: a half-written cache is never taken for a complete one
    return root
