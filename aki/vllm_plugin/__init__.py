"""AKI as a vLLM plugin: `vllm serve DIR` and `vllm.LLM(DIR)` load a saved AKI folder.

vLLM calls `register` in each of its processes through the `vllm.general_plugins` entry point
(pyproject.toml). The model module, which imports vLLM's internals, is imported by vLLM only when
it loads an AKI folder. Design and limits: docs/vllm.md.
"""

# The vLLM release the plugin was written and tested against (its model, attention and
# multimodal-processing classes are not a stable API).
SUPPORTED_VLLM = "0.32."


def register() -> None:
    """Make vLLM's model registry and transformers' AutoConfig know AKI."""
    import vllm
    from vllm import ModelRegistry

    import aki  # noqa: F401  (registers AkiConfig with transformers' AutoConfig, which vLLM reads config.json with)

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"AKI's vLLM plugin supports vLLM {SUPPORTED_VLLM}x; vLLM {vllm.__version__} is installed.")
    ModelRegistry.register_model("AkiForConditionalGeneration", "aki.vllm_plugin.model:AkiForConditionalGeneration")
    # vLLM's per-architecture configuration hooks, where its own models set their engine defaults (there
    # is no registration function; the table is public and the version is checked above). AKI's sets the
    # scheduler MMA needs for chunked prefill (aki.vllm_plugin.engine_config).
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .engine_config import AkiEngineConfig

    MODELS_CONFIG_MAP["AkiForConditionalGeneration"] = AkiEngineConfig
