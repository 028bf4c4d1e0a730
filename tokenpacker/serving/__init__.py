"""TokenPacker in vLLM: a native model and its multimodal processor, registered as an out-of-tree plugin.

Owns the `vllm.general_plugins` entry point (`register`) and `tokenpacker.serving.model`. vLLM is imported only
when vLLM loads the plugin; configuration/, modeling/ and processing/ never import this package.
"""

MODEL_ARCHITECTURE = "TokenPackerForConditionalGeneration"


def register() -> None:
    """Registers `TokenPackerForConditionalGeneration` with vLLM (called by vLLM in each of its processes)."""
    from vllm import ModelRegistry

    import tokenpacker  # noqa: F401  (registers the configuration and processors with the Auto classes)

    if MODEL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCHITECTURE, f"tokenpacker.serving.model:{MODEL_ARCHITECTURE}")
