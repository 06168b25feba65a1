"""Workloads: the Sample record, the MMSpec jsonl loader and the built-in synthetic suite."""

from .errors import WorkloadError
from .mmspec_jsonl import load_mmspec
from .registry import WorkloadSpec, builtin_workloads, load_workload
from .sample import TOPICS, Sample, SampleError
from .synthetic import synthetic_references, synthetic_suite

__all__ = [
    "TOPICS",
    "Sample",
    "SampleError",
    "WorkloadError",
    "WorkloadSpec",
    "builtin_workloads",
    "load_mmspec",
    "load_workload",
    "synthetic_references",
    "synthetic_suite",
]
