"""Public and synthetic datasets, each a loader returning a schema and three raw splits."""

from mtlrec.data.datasets.registry import DatasetSplits, describe_datasets, load_dataset

__all__ = ["DatasetSplits", "describe_datasets", "load_dataset"]
