"""Presets: the paper's model built from its preset, and unknown names refused."""

import pytest
import torch

from aki import AkiForConditionalGeneration
from aki.presets import config_from_preset


def test_an_unknown_preset_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="Unknown preset"):
        config_from_preset("aki-70b")


def test_aki_4b_parameter_count_on_the_meta_device():
    """The 4B preset builds the published architecture: ~4.3B parameters (SigLIP + resampler + Phi-3.5)."""
    config = config_from_preset("aki-4b")
    with torch.device("meta"):
        model = AkiForConditionalGeneration(config)
    resampler = sum(p.numel() for p in model.model.connector.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert 81e6 < resampler < 82e6  # paper digest: ~81.6M
    assert 4.2e9 < total < 4.4e9
