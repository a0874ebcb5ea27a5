"""What the plugin changes in vLLM's configuration for an MMA model (imported at plugin registration,
so it imports no more of vLLM than its configuration hooks)."""

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

# Under "vllm.", so that vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")

# AKI's scheduler (aki.vllm_plugin.scheduler), as vLLM's `scheduler_cls` names it.
MMA_SCHEDULER = "aki.vllm_plugin.scheduler.mma_scheduler"


class AkiEngineConfig(VerifyAndUpdateConfig):
    """What the plugin changes in vLLM's configuration for an MMA model, logged once at start."""

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        if getattr(vllm_config.model_config.hf_config, "attention_policy", None) != "mma":
            return
        scheduler = vllm_config.scheduler_config
        if scheduler.scheduler_cls is None:
            scheduler.scheduler_cls = MMA_SCHEDULER
            logger.info(
                "AKI (MMA): scheduler_cls=%s, vLLM's scheduler that never ends a prefill chunk inside an "
                "image's MMA window; prefix caching keys each image's blocks by the image and its window.",
                MMA_SCHEDULER,
            )
