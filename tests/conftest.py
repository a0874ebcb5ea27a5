import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import save_checkpoint  # noqa: E402

import aki  # noqa: E402,F401
from aki.presets import build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The tiny Phi-3 AKI (Perceiver connector) and its processor, float32, eval mode."""
    return build_tiny("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    """The tiny Llama AKI (MLP connector, three-token assistant header)."""
    return build_tiny("tiny-llama", seed=0)


@pytest.fixture(params=["tiny", "tiny-llama"])
def model_and_processor(request, tiny, tiny_llama):
    """Each tiny backbone in turn: Phi-3 with the Perceiver, Llama with the MLP connector."""
    return tiny if request.param == "tiny" else tiny_llama


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny):
    """The tiny model and processor saved as a native folder."""
    return save_checkpoint(*tiny, tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def images():
    """Two real photos from scikit-image."""
    from PIL import Image
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
