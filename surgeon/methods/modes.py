"""The names of the inference and merge modes: one definition for the schema, the CLI, the
expert layers and evaluation (import-light: no torch).

==============  ==========================================================================
``merge``       the merged dense weight of expert-split layers (``merge_mode``)
``stochastic``  a fresh uniform expert draw per forward pass per split matrix
``fixed``       every split matrix uses one expert (``eval.expert``, 0-based)
``ensemble``    the mean of the logits of the N ``fixed`` passes (N x cost); not a layer mode
==============  ==========================================================================

Merge modes: ``average`` (``W0 + D/N``, the N experts' mean) and ``jigsaw`` (``W0 + D``, each
entry from the expert that owns it).
"""
from __future__ import annotations

#: How expert-split layers behave in eval mode (set on the model's sampler).
LAYER_MODES = ("merge", "stochastic", "fixed")
#: The four inference mechanisms of MoSA Table 6 (``eval.inference``, ``surgeon eval --inference``).
INFERENCE_MODES = LAYER_MODES + ("ensemble",)
#: How expert-split matrices become one dense matrix (``eval.merge_mode``, ``surgeon merge --mode``).
MERGE_MODES = ("average", "jigsaw")
