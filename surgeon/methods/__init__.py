"""Surgery methods, one folder per method, found by :mod:`surgeon.methods.registry`.

Each folder ``<key>/`` holds ``spec.py`` (config, schema fragment, checks, description:
import-light) and ``method.py`` (the torch side: which modules it patches, with what layer).
Shared pieces: ``registry.py`` (the methods), ``modifiers.py`` (experts/prune configs),
``modes.py`` (inference and merge mode names), ``base.py`` (the layer and method bases),
``matrices.py`` (weight strategies), ``lowrank.py`` (the low-rank layer of LoRA, MoSL,
SparseLoRA, MLAE and DoRA), ``experts.py`` (eval-time expert control).

Importing this package is light (no torch); the torch modules are imported where a model is
built.
"""
