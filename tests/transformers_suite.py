"""transformers' own common test suites, from the released sdist of the installed version.

Nothing of transformers' test code lives in this repository: `load()` downloads the sdist of the
installed transformers with pip (the registry is the only network this needs), unpacks its
`tests/` folder under `.cache/transformers-tests/<version>/` and caches it there.

The sdist ships `tests/test_*_common.py` but not the folders they import from:
`tests/generation/` (GenerationTesterMixin), `tests/exporters/` (ExportTesterMixin),
`tests/utils/` (`config_common_kwargs`) and the repository's `utils/fetch_hub_objects_for_ci.py`
(ProcessorTesterMixin's media). `load()` writes stand-ins in their place (`STAND_INS`).

GenerationTesterMixin cannot be run from any release: no transformers sdist on PyPI ships
`tests/generation/`. Checked: 4.10.3, 4.20.1 and 4.25.1 (no `tests/` at all), 4.28.1, 4.30.2,
4.36.2, 4.40.2, 4.44.2, 4.48.3, 4.51.3, 4.53.3, 4.56.2, 4.57.6, 5.0.0, 5.20.2, 5.22.2, 5.23.0,
5.24.0 and 5.25.0 (only top-level `tests/test_*.py`, never a subfolder). Nor does another package found: the
fork adapter-transformers ships no tests, and Debian packages no transformers. Its stand-in is an
empty mixin, and the peer suite lists the test that notices among its skips.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import transformers
from PIL import Image

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "transformers-tests"
PACKAGE = "transformers_tests"  # the sdist's tests/, as an importable package
STAND_IN = '"""Stand-in written by aki\'s tests/transformers_suite.py: this file is not in the sdist."""\n\n'
# Paths relative to the cache folder of a version. test_processing_common.py imports
# `fetch_hub_objects_for_ci` from ../utils, where transformers' CI keeps the script that downloads
# its test media beforehand; the stand-in finds them in media/ (written by `write_media`), and
# leaves any other URL as is, as the original does for a file it has not downloaded.
STAND_INS = {
    f"{PACKAGE}/generation/test_utils.py": STAND_IN + "class GenerationTesterMixin:\n    pass\n",
    f"{PACKAGE}/exporters/test_export.py": STAND_IN + "class ExportTesterMixin:\n    pass\n",
    f"{PACKAGE}/utils/test_configuration_utils.py": STAND_IN + "config_common_kwargs = {}\n",
    "utils/fetch_hub_objects_for_ci.py": STAND_IN
    + "from pathlib import Path\n\n"
    + "MEDIA = Path(__file__).resolve().parent.parent / 'media'\n\n\n"
    + "def url_to_local_path(url, return_url_if_not_found=True):\n"
    + "    path = MEDIA / url.split('/')[-1]\n"
    + "    return url if return_url_if_not_found and not path.exists() else str(path)\n",
}
# The test media of the suite's URLs that AKI can take: images (videos and audio are modalities
# AKI has not, so the tests that read them skip). Random pixels, at coco_sample.png's size.
MEDIA = {"coco_sample.png": (480, 640)}


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


def write_media(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (height, width) in MEDIA.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)


def is_complete(root: Path) -> bool:
    expected = [f"{PACKAGE}/test_modeling_common.py", *STAND_INS, *(f"media/{name}" for name in MEDIA)]
    return all((root / path).exists() for path in expected)


def load(version: str = transformers.__version__) -> Path:
    """The folder to put on sys.path to `import transformers_tests`; fetched once, then cached."""
    root = CACHE / version
    if is_complete(root):
        return root
    with tempfile.TemporaryDirectory() as scratch:
        archive = download_sdist(version, Path(scratch))
        prefix = f"transformers-{version}/tests/"
        staging = Path(scratch) / "staging"
        with tarfile.open(archive) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not any(m.name.endswith("/test_modeling_common.py") for m in members):
                raise SuiteUnavailable(f"The transformers=={version} sdist holds no tests/test_modeling_common.py.")
            for member in members:
                target = staging / PACKAGE / member.name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(sdist.extractfile(member).read())
        (staging / PACKAGE / "__init__.py").touch()
        for path, text in STAND_INS.items():
            stand_in = staging / path
            if not stand_in.exists():
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                if path.startswith(PACKAGE):
                    (stand_in.parent / "__init__.py").touch()
                stand_in.write_text(text)
        write_media(staging / "media")
        shutil.rmtree(root, ignore_errors=True)  # an older, incomplete layout
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, root)  # last: a half-written cache is never taken for a complete one
    return root
