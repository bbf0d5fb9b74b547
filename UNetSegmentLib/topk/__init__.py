"""Learned top-k patch sampling ("No More Sliding Window", Jeon et al., IEEE TMI 2025).

A coarse global branch segments the downsampled volume and scores every sliding-window candidate;
only the k best candidates run through the full-resolution backbone. See docs/topk_design.md.
Importing this package needs torch; `UNetSegmentLib.topk.model.build_topk_model` rebuilds a model
from checkpoint metadata.
"""

from .model import TopKSegmenter, TopKSettings, build_topk_model, gaussian_importance, window_starts
from .selection import deterministic_topk, gumbel_topk_straight_through, temperature_at

__all__ = ["TopKSegmenter", "TopKSettings", "build_topk_model", "deterministic_topk", "gaussian_importance",
           "gumbel_topk_straight_through", "temperature_at", "window_starts", "topk_inference", "train_topk"]


def __getattr__(name):  # keep the training/inference modules (and their imports) lazy
    if name == "topk_inference":
        from .inference import topk_inference
        return topk_inference
    if name == "train_topk":
        from .training import train_topk
        return train_topk
    raise AttributeError(name)
