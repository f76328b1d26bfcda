from .registry import ArchSpec, lookup, registered_families, registered_model_types, register

__all__ = ["ArchSpec", "lookup", "register", "registered_families", "registered_model_types"]
