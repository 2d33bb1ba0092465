"""Metrics: Fréchet distances (pytorch-fid), FID with Inception, reference statistics."""
