"""``dora``: DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024).

``spec.py``: config, schema fragment, checks, description (import-light). ``method.py``: the
patching and the :class:`DoraMagnitude` strategy on the shared low-rank layer.
"""
