"""transformers' own common model and config tests, run against AKI as in-tree VLMs run them.

The suites come from the released sdist of the installed transformers (`transformers_suite.load`,
fetched with pip on first use and cached under `.cache/transformers-tests/`); nothing of them is
copied here. Both tiny presets run: `tiny` (Phi-3, Perceiver) and `tiny-llama` (Llama, MLP
connector, three-token assistant header). Every input holds an image with a closed question
window, so MMA is active in every forward.

GenerationTesterMixin is not run (blocked): its file, `tests/generation/test_utils.py`, is in no
transformers sdist on PyPI, from 4.10 to 5.25, nor in another registry package that was found (the
releases checked are listed in `transformers_suite`). Generation conformance (assisted and prompt-lookup
decoding, `inputs_embeds`, static cache, beam search against greedy) is tested in test_modeling_aki.py.

Result with transformers 5.25.0 (the lock's), both presets (328 tests): 233 passed, 95 skipped, 0 failed
(5.24.0: 340 tests, 233 passed, 107 skipped).

Skips, all in one place: `SKIPS` below holds the ones this module adds (each with its reason).
The suite's own skips, as pytest -rs reports them, are of three kinds:
* hardware: "test requires accelerator", "multiple accelerators", "Flash Attention" (2, 3, 4),
  "MPS", "the kernels library", and `@slow` tests ("test is slow", RUN_SLOW unset);
* features AKI does not have: grouped_mm and sparse experts (MoE), router logits, encoder-decoder,
  position-embedding resizing, sliding-window masks (the tiny backbones have none), axial RoPE,
  partial rotary embeddings (Llama has none; the Phi-3 variant runs), `_keep_in_fp32_modules`,
  non-prefix weight conversions;
* `test_sdpa_can_dispatch_non_composite_models`: for composite models (its message says "does not
  support SDPA"; the composite variant of the test runs and passes).
"""

import sys
import unittest

import pytest
import torch

from aki import AkiConfig, AkiForConditionalGeneration, AkiModel
from aki.presets import config_from_preset

try:
    from transformers_suite import SuiteUnavailable, load

    sys.path.insert(0, str(load()))
except SuiteUnavailable as error:  # no registry access: a clear skip, not a failure
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

from transformers.models.auto import modeling_auto  # noqa: E402
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402

# Harness adaptation: the mixins decide which inputs (labels, ...) a class takes by looking its
# name up in transformers' Auto name tables, which list in-tree models only. AKI registers itself
# with the Auto classes at import (`aki/__init__.py`) but those registrations do not reach the
# name tables, so the two tables an image-text-to-text model appears in get AKI's entry here.
modeling_auto.MODEL_MAPPING_NAMES.setdefault("aki", "AkiModel")
modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault("aki", "AkiForConditionalGeneration")

RANDOM_IDS = (
    "feeds random ids over the whole vocabulary, image placeholder included, without pixel_values: "
    "AKI refuses image placeholders without images at prefill instead of reading them as text"
)
# Every test the suite skips for AKI, with its reason (as in-tree test files list theirs).
SKIPS = {
    # Hardware and network.
    "test_flash_attn": "needs a CUDA GPU (flash attention); AKI refuses flash attention for the text model anyway",
    "test_sdpa_can_dispatch_on_flash": "needs a CUDA GPU",
    "test_sdpa_can_compile_dynamic": "needs a CUDA GPU",
    "test_multi_gpu_data_parallel_forward": "needs several GPUs",
    "test_model_parallelism": "needs several GPUs",
    "test_cpu_offload": "needs a GPU (accelerate offload)",
    "test_disk_offload": "needs a GPU (accelerate offload)",
    "test_torch_compile_for_training": "needs a CUDA GPU",
    # Documented design choices.
    "test_generation_tester_mixin_inheritance": (
        "GenerationTesterMixin is a stand-in: no transformers sdist on PyPI (4.10 to 5.25) ships tests/generation/"
    ),
    "test_torch_export": "MMA's mask looks at the data (which chunk holds an image with a question): not exportable",
    "test_model_rope_scaling_from_config": RANDOM_IDS,
    "test_model_rope_with_partial_rotation": RANDOM_IDS,  # about 2% of draws (10 ids of 512) hold id 3
}


class AkiModelTester:
    """Builds a tiny AKI config and inputs whose images are followed by a question and the assistant header."""

    # 7: the batch the eager-vs-sdpa tests run; a smaller one gets rows of random ids appended,
    # with image placeholders that match no image.
    def __init__(self, parent, preset: str, batch_size: int = 7, is_training: bool = True):
        self.parent = parent
        self.preset = preset
        self.batch_size = batch_size
        self.is_training = is_training
        config = self.get_config()
        text = config.text_config
        self.num_hidden_layers = text.num_hidden_layers
        self.num_attention_heads = text.num_attention_heads
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size
        self.text_config, self.vision_config = text, config.vision_config
        self.image_size, self.patch_size = config.vision_config.image_size, config.vision_config.patch_size
        # <bos> <image>*v question(4) <assistant header> answer(3)
        self.num_image_tokens = config.num_image_tokens
        self.seq_length = 1 + self.num_image_tokens + 4 + len(config.assistant_marker_ids) + 3

    def get_config(self) -> AkiConfig:
        return config_from_preset(self.preset)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        first_free_id = 12  # the tiny tokenizer's special tokens take ids 0..11
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - first_free_id) + first_free_id
        image_end = 1 + self.num_image_tokens
        marker = torch.tensor(config.assistant_marker_ids)
        input_ids[:, 0] = config.text_config.bos_token_id
        input_ids[:, 1:image_end] = config.image_token_id
        input_ids[:, image_end + 4 : image_end + 4 + len(marker)] = marker
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
        }
        return config, inputs


# The project's pytest settings ignore FutureWarning; the suite checks that the old
# `past_key_values` name warns, so this module lets them through.
@pytest.mark.filterwarnings("always::FutureWarning")
class AkiCommonTests(ModelTesterMixin):
    preset: str
    all_model_classes = (AkiModel, AkiForConditionalGeneration)
    pipeline_model_mapping = {}
    additional_model_inputs = ["pixel_values"]  # the eager-vs-sdpa tests send these with input_ids
    _is_composite = True
    test_resize_embeddings = True
    test_torch_exportable = False  # see SKIPS["test_torch_export"]
    # Harness adaptation: the suite dates a model by the copyright year atop its config file and
    # skips `test_can_init_all_missing_weights` for those before 2023; aki's files carry no year.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        name = self._testMethodName
        for prefix, reason in SKIPS.items():
            if name.startswith(prefix):
                self.skipTest(reason)
        self.model_tester = AkiModelTester(self, self.preset)
        self.config_tester = ConfigTester(self, config_class=AkiConfig, has_text_modality=False)

    def test_config(self):
        # ConfigTester.run_common_tests without `check_config_arguments_init`, whose table of
        # common kwargs (tests/utils/) is not in the sdist.
        tester = self.config_tester
        preset = self.model_tester.get_config()
        # Values away from the defaults, so that the diff-only JSON holds them.
        tester.inputs_dict = {
            "image_token_id": preset.image_token_id,
            "assistant_marker_ids": preset.assistant_marker_ids,
            "attention_policy": "causal",
            "perceiver_depth": 1,
        }
        for check in (
            tester.create_and_test_config_to_json_string,
            tester.create_and_test_config_to_json_file,
            tester.create_and_test_config_from_and_save_pretrained,
            tester.create_and_test_config_from_and_save_pretrained_subfolder,
            tester.create_and_test_config_from_and_save_pretrained_composite,
            tester.create_and_test_config_from_pretrained_custom_kwargs,
        ):
            check()

    def test_mma_is_active_in_the_suites_inputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = AkiModel(config)
        image_rows = (model.window_ids(inputs["input_ids"]) > 0).sum(-1)
        assert (image_rows == self.model_tester.num_image_tokens).all()


class AkiTinyPhi3Test(AkiCommonTests, unittest.TestCase):
    preset = "tiny"


class AkiTinyLlamaTest(AkiCommonTests, unittest.TestCase):
    preset = "tiny-llama"
