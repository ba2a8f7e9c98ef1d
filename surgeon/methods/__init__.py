"""Surgery methods, one package per family, registered by recipe key (see base.py)."""
from .base import METHODS, ExpertSampler, Method, PatchContext, SurgeryLayer, get_method, register

__all__ = ["METHODS", "ExpertSampler", "Method", "PatchContext", "SurgeryLayer", "get_method", "register"]
