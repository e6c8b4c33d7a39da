"""Model architectures; registry.py maps config.architectures[0] to a class."""

from pagellm.model_executor.models.registry import MODEL_REGISTRY, get_model_class, supported_architectures

__all__ = ["MODEL_REGISTRY", "get_model_class", "supported_architectures"]
