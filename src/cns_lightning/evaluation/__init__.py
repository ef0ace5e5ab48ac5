"""Evaluation of continual personalization: CLIP-I / CLIP-T metrics, forgetting matrices,
reports, sweep aggregation and logger helpers (see docs/evaluation.md)."""

from .metrics import ClipScorer, build_tiny_clip, clip_image_similarity, clip_text_score, load_clip
from .protocol import ContinualEvaluator

__all__ = [
    "ClipScorer",
    "ContinualEvaluator",
    "build_tiny_clip",
    "clip_image_similarity",
    "clip_text_score",
    "load_clip",
]
