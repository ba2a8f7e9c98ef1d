"""``mlae``: Masked LoRA Experts (Wang et al. 2024; METHODS.md §3).

``ΔW = Σ_j m_j λ_j b_j a_jᵀ`` on a Linear/Conv2d (every block's ``attn.qkv`` in the paper),
``rank`` = E·k with E experts of rank ``expert_rank`` = k, coefficients λ trainable.

Masking (``mlae.masking.strategy``, paper Table 4):

- ``stochastic``: per training forward and layer each expert is kept with probability 1-p
  (draws from the model's seeded sampler), kept ones scaled 1/(1-p); eval uses all experts
  unscaled. ``p`` is one number or one per matched layer.
- ``fixed``: per-layer expert counts (``pattern`` or ``counts``, see :mod:`.allocation`); the
  masked experts do not exist (no parameters). A layer with 0 experts is left unpatched.
- ``mixed``: the fixed allocation plus stochastic masking with one p.
- ``none``: plain cellular decomposition (all experts, λ trainable).

Merging folds ``ΔW`` (all experts, λ, no mask scaling) into the base weight. ``spec.py``:
config, schema, checks, description; ``method.py``: the patching; ``allocation.py``: the
fixed patterns; ``similarity.py``: the experts' similarity (MLAE paper §4.3).
"""
