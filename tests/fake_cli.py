"""Test-only entry point: `mmspec-orch` with FakeRunner, for tests that run the CLI in a
subprocess (so they can SIGKILL its driver). Not installed and never imported by the package:

    python -m tests.fake_cli submit GRID_FILE --address 127.0.0.1:6379

MMSPEC_TEST_FAKE_CONTROLS (JSON) gives FakeRunner controls for every shard, e.g.
'{"delay_s": 0.2}' (grid files cannot: their method_args must suit the real drafters).
"""

from __future__ import annotations

import json
import os

from mmspec.cli.main import Hooks, main
from tests.fake_runner import ship_to_ray, with_controls

CONTROLS_ENV = "MMSPEC_TEST_FAKE_CONTROLS"


def run() -> None:
    ship_to_ray()
    controls = json.loads(os.environ.get(CONTROLS_ENV, "{}"))
    main(obj=Hooks(runner_cls=with_controls(**controls)))


if __name__ == "__main__":
    run()
