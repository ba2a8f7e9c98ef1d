"""What a timm backbone is made of: blocks, attentions (with their q/k/v rows) and MLPs found by
structure (:mod:`.structure`), and the per-family conventions structure cannot tell
(:mod:`.conventions`). Below the methods and the surgery, which both read it."""
from .structure import Anatomy, Site, anatomy, norm_before

__all__ = ["Anatomy", "Site", "anatomy", "norm_before"]
