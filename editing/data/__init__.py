"""The datasets seqedit reads and where they come from (see :mod:`editing.data.resolve`)."""

from editing.data.catalog import BundleSpec, DatasetSpec, HubSource, Sample, catalog, dataset_spec
from editing.data.resolve import DATA_ENV, DataUnavailable, Resolved, mirror_dir, resolve

__all__ = ["BundleSpec", "DatasetSpec", "HubSource", "Sample", "catalog", "dataset_spec", "DATA_ENV",
           "DataUnavailable", "Resolved", "mirror_dir", "resolve"]
