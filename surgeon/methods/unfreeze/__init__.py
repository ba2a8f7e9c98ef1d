"""``unfreeze``: train existing backbone parameters — BitFit (``bias``) and full fine-tuning (``all``).
``spec.py``: schema and description; ``method.py``: the patching."""
