"""Redundancy codebooks ("Beyond Intermediate States: Explaining Visual Redundancy through Language").

Offline, `build_codebook` finds visual tokens whose presence does not change the model's textual output and
clusters them into a codebook of redundant prototypes; at inference the `codebook` intervention
(`vlmscope.interventions.codebook`) drops every visual token that is too similar to a prototype.
"""

from vlmscope.codebook.divergence import divergence, reference_divergence, textbook_jsd, top1_probability
from vlmscope.codebook.dpc_knn import dpc_knn
from vlmscope.codebook.io import Codebook, load_codebook, save_codebook, sidecar_path
from vlmscope.codebook.selection import keep_mask, redundancy_scores

__all__ = [
    "Codebook",
    "divergence",
    "dpc_knn",
    "keep_mask",
    "load_codebook",
    "redundancy_scores",
    "reference_divergence",
    "save_codebook",
    "sidecar_path",
    "textbook_jsd",
    "top1_probability",
]
