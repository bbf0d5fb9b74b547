"""Inference engines: sliding window (Gaussian blending) and whole-volume."""
