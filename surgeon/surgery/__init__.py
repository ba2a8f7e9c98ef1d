"""Resolve selectors, patch modules, probe, count and merge (method-agnostic); the surgery's state."""
from .driver import (SurgeryPlan, Target, apply_surgery, classifier_heads, classifier_parameters, merge, probe_input,
                     surgery_layers)
from .selectors import compile_selector, select_modules
from .state import backbone_fingerprint, load_surgery_state, surgery_state

__all__ = ["SurgeryPlan", "Target", "apply_surgery", "backbone_fingerprint", "classifier_heads", "classifier_parameters",
           "compile_selector", "load_surgery_state", "merge", "probe_input", "select_modules", "surgery_layers",
           "surgery_state"]
