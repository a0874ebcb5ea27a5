"""transformers' own common processor tests (ProcessorTesterMixin), run against AkiProcessor.

The suite comes from the released sdist of the installed transformers (`transformers_suite.load`,
fetched with pip on first use and cached under `.cache/transformers-tests/`); nothing of it is
copied here. Set up as in-tree VLM processor tests are (llava's), for both tiny presets: `tiny`
(Phi-3 chat template, 8 image tokens) and `tiny-llama` (Llama-3 headers, 16 image tokens).

Harness adaptations:
* The suite reads its media through transformers' CI script `utils/fetch_hub_objects_for_ci.py`,
  which is not in the sdist; `transformers_suite` writes a stand-in that serves a generated image
  for the suite's image URL (no Hub access at test time).
* Without a Hub checkpoint the mixin builds the components through the `_setup_<component>` hooks
  below, which build the tiny presets' tokenizer and image processor offline.

Result with transformers 5.25.0 (the lock's), both presets (138 tests): 76 passed, 62 skipped, 0 failed,
in seconds (5.24.0: 74 passed, 62 skipped). This module adds no skips; the suite's own, as pytest -rs
reports them, per preset:
* modalities AKI has not (25): video and audio ("video_processor / feature_extractor /
  audio_processor attribute not present", "Processor doesn't accept videos at input",
  "Processor has no video / audio processor");
* libraries for those modalities, which the project does not install (5): "test requires
  librosa", "test requires Torchcodec";
* `test_apply_chat_template_tool_calls_no_content` (1): "Chat template does not support tools";
  AKI's chat templates, like the AKI-4B prompt they follow, have no tool role.
"""

import sys
import unittest

import pytest

from aki import AkiImageProcessor, AkiProcessor
from aki.presets import PRESETS, build_tiny_tokenizer, config_from_preset

try:
    from transformers_suite import SuiteUnavailable, load

    sys.path.insert(0, str(load()))
except SuiteUnavailable as error:  # no registry access: a clear skip, not a failure
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

from transformers_tests.test_processing_common import ProcessorTesterMixin  # noqa: E402


class AkiProcessorCommonTests(ProcessorTesterMixin):
    processor_class = AkiProcessor
    preset: str

    @classmethod
    def _setup_image_processor(cls):
        size = config_from_preset(cls.preset).vision_config.image_size
        return AkiImageProcessor(size={"height": size, "width": size})

    @classmethod
    def _setup_tokenizer(cls):
        return build_tiny_tokenizer()

    @classmethod
    def prepare_processor_dict(cls):
        return {
            "num_image_tokens": config_from_preset(cls.preset).num_image_tokens,
            "chat_template": PRESETS[cls.preset]["chat_template"],
        }


class AkiTinyPhi3ProcessorTest(AkiProcessorCommonTests, unittest.TestCase):
    preset = "tiny"


class AkiTinyLlamaProcessorTest(AkiProcessorCommonTests, unittest.TestCase):
    preset = "tiny-llama"
