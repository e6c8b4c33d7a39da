"""Model architectures; registry.py holds one ArchSpec record per architecture, interface.py the Protocol a
model class follows."""

from pagellm.model_executor.models.registry import ARCHITECTURES, get_model_class, spec_for, supported_architectures

__all__ = ["ARCHITECTURES", "get_model_class", "spec_for", "supported_architectures"]
