"""Data sets and partitioners."""

from .demo import DemoDataset, load_demo_dataset
from .partition import pathological_partition

__all__ = ["DemoDataset", "load_demo_dataset", "pathological_partition"]
