"""Test-only entry point: `mmspec-orch` with FakeRunner, for tests that run the CLI in a
subprocess (so they can SIGKILL its driver). Not installed and never imported by the package:

    python -m tests.fake_cli submit GRID_FILE --address 127.0.0.1:6379

MMSPEC_TEST_FAKE_CONTROLS (JSON) gives FakeRunner controls for every shard, e.g.
'{"delay_s": 0.2}' (grid files cannot: their method_args must suit the real drafters).
MMSPEC_TEST_DISK_FULL_AFTER=N lets the driver write N files (the manifest counts) and then
fails every write with ENOSPC, mid-file, as a full disk would.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from mmspec.cli.main import Hooks, main
from tests.fake_runner import ship_to_ray, with_controls

CONTROLS_ENV = "MMSPEC_TEST_FAKE_CONTROLS"
DISK_FULL_ENV = "MMSPEC_TEST_DISK_FULL_AFTER"


def fill_disk_after(files: int) -> None:
    from mmspec.orchestrator import store

    real_write = store._write_atomic
    written = [0]

    def write(path: Path, body: Any) -> None:
        written[0] += 1
        if written[0] <= files:
            return real_write(path, body)

        def no_space(f: Any) -> None:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real_write(path, no_space)

    store._write_atomic = write


def run() -> None:
    ship_to_ray()
    if DISK_FULL_ENV in os.environ:
        fill_disk_after(int(os.environ[DISK_FULL_ENV]))
    controls = json.loads(os.environ.get(CONTROLS_ENV, "{}"))
    main(obj=Hooks(runner_cls=with_controls(**controls)))


if __name__ == "__main__":
    run()
