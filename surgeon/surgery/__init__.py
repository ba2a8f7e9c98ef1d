"""Resolve selectors, patch modules, probe, count and merge (method-agnostic)."""
from .driver import SurgeryPlan, Target, apply_surgery, classifier_parameters, merge, probe_input, surgery_layers
from .selectors import compile_selector, select_modules

__all__ = ["SurgeryPlan", "Target", "apply_surgery", "classifier_parameters", "compile_selector", "merge",
           "probe_input", "select_modules", "surgery_layers"]
