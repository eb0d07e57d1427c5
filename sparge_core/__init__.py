"""sparge_core: training-free block-sparse attention (SpargeAttn) in Triton, with a PyTorch reference.

Public API (docs/design.md, "Public API")::

    from sparge_core import sparge_attn, predict_block_mask, block_sparse_attn, BLOCK_Q, BLOCK_K

Only torch and triton are imported here.
"""

from .api import BACKENDS, block_sparse_attn, predict_block_mask, resolve_backend, sparge_attn
from .ops.blocks import BLOCK_K, BLOCK_Q
from .stats import SparsityStats

__all__ = [
    "BACKENDS",
    "BLOCK_K",
    "BLOCK_Q",
    "SparsityStats",
    "block_sparse_attn",
    "predict_block_mask",
    "resolve_backend",
    "sparge_attn",
]
__version__ = "0.1.0"
