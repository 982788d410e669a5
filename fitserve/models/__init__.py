"""Model code: one decoder for Llama, Mistral, Qwen2 and Qwen3, its config and weight loading."""

from fitserve.models.config import ModelConfig, ModelLoadError, load_model_config
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.loader import load_model

__all__ = ["LlamaForCausalLM", "ModelConfig", "ModelLoadError", "load_model", "load_model_config"]
