"""Cadenza datasets. Each yields ``(image tensor, token ids)`` and resumes exactly."""

from cadenza.datasets import csv, streaming, webdataset  # noqa: F401 - registers the formats
from cadenza.datasets.csv import CsvDataset
from cadenza.datasets.loader import ResumableLoader, ResumableSampler
from cadenza.datasets.synthetic import SyntheticDataset
from cadenza.datasets.webdataset import WebDataset

__all__ = ["CsvDataset", "ResumableLoader", "ResumableSampler", "SyntheticDataset", "WebDataset"]
