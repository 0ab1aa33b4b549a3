"""Cadenza datasets. Each yields ``(image tensor, token ids)`` and resumes exactly."""

from cadenza.datasets.loader import ResumableLoader, ResumableSampler
from cadenza.datasets.synthetic import SyntheticDataset

__all__ = ["ResumableLoader", "ResumableSampler", "SyntheticDataset"]
