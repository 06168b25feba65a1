"""Starting and stopping Ray, in one place.

`--local` starts a private single-node Ray on 127.0.0.1 with no dashboard; `address=` joins
an existing cluster. Ray's token authentication is left at its default. If Ray is already
initialised in this process (tests, notebooks) the session reuses it and leaves it running.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class RaySession:
    mode: str  # "local", "address" or "existing"
    resources: dict[str, float]  # cluster totals, e.g. {"CPU": 2.0, "GPU": 0.0}
    # each live node's resources: a worker cannot span nodes, so slots are counted per node
    nodes: tuple[dict[str, float], ...] = ()


def keep_on_loopback() -> None:
    """Make a local Ray node bind to 127.0.0.1 instead of the host's network address.

    Ray reads the variable when it is imported (and its child processes read it at start),
    so it is set first; if Ray was imported earlier in this process, its already-read
    constant is updated too.
    """
    os.environ[_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def resolve_mode(local: bool, address: str | None) -> str | None:
    """None for a local node, else the address to join (--address, then RAY_ADDRESS)."""
    if local:
        return None
    return address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(local: bool = False, address: str | None = None) -> Iterator[RaySession]:
    """Connect to Ray for the duration of the block; shut down only what was started here."""
    target = resolve_mode(local, address)
    if target is None:
        keep_on_loopback()
    import ray  # after keep_on_loopback: Ray reads the setting at import

    if ray.is_initialized():
        yield RaySession("existing", dict(ray.cluster_resources()), _live_nodes(ray))
        return
    if target is None:
        ray.init(
            address="local",  # never join a stale cluster found under /tmp/ray
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
        mode = "local"
    else:
        ray.init(address=target)
        mode = "address"
    try:
        yield RaySession(mode, dict(ray.cluster_resources()), _live_nodes(ray))
    finally:
        ray.shutdown()


def _live_nodes(ray: Any) -> tuple[dict[str, float], ...]:
    return tuple(dict(n["Resources"]) for n in ray.nodes() if n.get("Alive"))
