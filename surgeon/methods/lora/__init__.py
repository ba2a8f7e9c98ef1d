"""``lora``: LoRA (Hu et al. 2021) and its MoSA variants on Linear / Conv2d layers.

One recipe key, three methods (METHODS.md §1-2, MoSA paper Table 13):

- **LoRA** — ``ΔW = (α/r) · B A``, ``A`` kaiming-uniform(a=√5), ``B`` zero, dropout on the
  LoRA input; ``slices: [q, v]`` adapts only those thirds of a fused qkv Linear (one (A, B)
  pair per slice, as the papers' "LoRA on q and v" = 0.59M at rank 16 on ViT-B/16);
- **MoSL** — the rule has ``experts``: A (down) and/or B (up) are split into N sparse experts
  (:class:`~surgeon.methods.matrices.ExpertSplitMatrix`), one drawn per training forward;
- **SparseLoRA** — the rule has ``prune``: A/B keep a fixed random fraction of their entries.

All three are the shared :class:`~surgeon.methods.lowrank.LowRankLayer` with a fixed ``α/r``
weighting, and fold into the base weight at merge. ``spec.py``: config, schema, checks,
description; ``method.py``: the patching.
"""
