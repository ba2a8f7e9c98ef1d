"""``adapter``: bottleneck adapters (AdaptFormer, Pfeiffer, Houlsby) and, composed onto them, MoSA
(``experts``) and SparseAdapter (``prune``).

``spec.py``: config, schema fragment, checks, description (import-light). ``method.py``: the
patching; ``layer.py``: :class:`AdapterLayer` and its merged form :class:`MergedAdapter`.
"""
