"""Where a run ran: the `environment` object of its manifest, one record for writer and readers.

The orchestrator fills it from what it probes on the driver when a run starts (CPU, memory,
the GPUs NVML sees, the driver); the importer from what the user states about a run made
elsewhere (an imported run's machine is unknown unless told). Reports show it, and `compare`
warns when two runs ran on different hardware, since their timings then compare machines as
well as code. Per-row devices stay in the rows (`device_name`, `host`): in a Ray cluster the
workers are not the driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

ENVIRONMENT = "environment"  # the manifest key
Source = Literal["probed", "stated"]


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML names it."""

    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Environment:
    """The machine of a run; None (or no GPUs) where it is not known."""

    source: Source  # probed on the driver, or stated by whoever imported the run
    cpu: str | None = None  # model name, e.g. "AMD EPYC 7763 64-Core Processor"
    cpu_cores: int | None = None  # logical cores the OS reports
    memory_bytes: int | None = None  # physical memory
    gpus: tuple[Gpu, ...] = ()
    gpu_driver: str | None = None  # e.g. "550.54.15"
    cuda_driver: str | None = None  # the CUDA version the driver supports, e.g. "12.4"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the manifest stores it."""
        data = asdict(self)
        data["gpus"] = [asdict(gpu) for gpu in self.gpus]
        return data

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Environment | None:
        """The manifest's environment; None for a manifest written before it had one.

        Unknown keys are ignored and wrong types read as unknown, so an old or hand-edited
        manifest never stops a report.
        """
        data = manifest.get(ENVIRONMENT)
        if not isinstance(data, Mapping):
            return None
        gpus = tuple(
            Gpu(str(g["name"]), _int(g.get("memory_bytes")))
            for g in data.get("gpus") or []
            if isinstance(g, Mapping) and g.get("name")
        )
        return cls(
            source="stated" if data.get("source") == "stated" else "probed",
            cpu=_str(data.get("cpu")),
            cpu_cores=_int(data.get("cpu_cores")),
            memory_bytes=_int(data.get("memory_bytes")),
            gpus=gpus,
            gpu_driver=_str(data.get("gpu_driver")),
            cuda_driver=_str(data.get("cuda_driver")),
        )

    @property
    def accelerator(self) -> str | None:
        """What the timings ran on, in a few words: "2 × NVIDIA H100 80GB HBM3", the CPU when
        there is no GPU, None when nothing is known."""
        if self.gpus:
            names = [gpu.name for gpu in self.gpus]
            return ", ".join(
                f"{names.count(n)} × {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names)
            )
        return self.cpu


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def software(manifest: Mapping[str, Any]) -> dict[str, str]:
    """What a run's numbers may depend on besides the hardware, as the manifest recorded it:
    Python, the packages' versions (manifest `packages`), the GPU driver, the CUDA version it
    supports and the CPU model; what it did not record is left out, so two runs compare on
    what both recorded."""
    found: dict[str, str] = {}
    if isinstance(manifest.get("python"), str):
        found["Python"] = manifest["python"]
    packages = manifest.get("packages")
    if isinstance(packages, Mapping):
        for name, version in sorted(packages.items()):
            found[str(name)] = str(version) if version else "not installed"
    env = Environment.from_manifest(manifest)
    if env is not None:
        for label, value in (
            ("GPU driver", env.gpu_driver),
            ("CUDA (driver)", env.cuda_driver),
            ("CPU", env.cpu),
        ):
            if value:
                found[label] = value
    return found
