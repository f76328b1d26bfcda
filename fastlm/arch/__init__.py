from .spec import ArchSpec
from .config import ArchConfig, ArchConfigError, RopeConfig, get_path, resolve
from .registry import lookup, registered_families, registered_model_types, register

__all__ = ["ArchConfig", "ArchConfigError", "ArchSpec", "RopeConfig", "get_path", "resolve", "lookup", "register", "registered_families", "registered_model_types"]
