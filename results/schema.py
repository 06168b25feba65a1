"""The one Arrow schema of result rows (one row per sample and turn), and its record type.

Bump SCHEMA_VERSION on any change of fields or meaning; readers check it, and read the older
versions in READABLE_VERSIONS by filling what each lacks (see ADDED_IN).

Version 2 (issue 18) added `base_method` and `method_args`: `method` is then what the row's
cell calls the method, a variant's name where the grid ran one (results/variants.py).
Version 3 (issue 20) added `verify_cost_tokens` and `verify_cost_s`: the target's verification
cost t(T) as the worker that ran the row measured it (methods/verify_cost.py), for the report's
roofline; null in older runs and imported ones.
Version 4 (issue 19) added the serving scenario: `scenario` ("static" | "continuous" |
"poisson"), `rate` (poisson arrivals per second), and per request `arrival_s`, `queue_s`,
`ttft_s` and `token_times_s`. In a serving cell `batch_size` is the concurrency cap, and
`batch_index`/`batch_s` name the request stream the row ran in and that stream's wall time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# The fields each version added, for readers of files written before it.
ADDED_IN: dict[int, tuple[str, ...]] = {
    2: ("base_method", "method_args"),
    3: ("verify_cost_tokens", "verify_cost_s"),
    4: ("scenario", "rate", "arrival_s", "queue_s", "ttft_s", "token_times_s"),
}

RESULT_SCHEMA = pa.schema(
    [
        # identity of the cell and the sample
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # a variant's name, where one ran
        pa.field("base_method", pa.string(), nullable=False),  # the registered method
        # the arguments the drafter ran with, defaults included, as canonical JSON; null where
        # not known (imported runs)
        pa.field("method_args", pa.string()),
        # the most rows decoding together: a static batch's size, a serving cell's concurrency
        pa.field("batch_size", pa.int32(), nullable=False),
        # how requests reach the engine (orchestrator/grid.py "scenario"); `rate`: poisson
        # arrivals per second, null otherwise
        pa.field("scenario", pa.string(), nullable=False),
        pa.field("rate", pa.float64()),
        pa.field("temperature", pa.float64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("repeat", pa.int32(), nullable=False),
        pa.field("workload", pa.string(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("turn", pa.int32(), nullable=False),
        # outcome
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("new_tokens", pa.int32(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),  # verification forwards after prefill
        pa.field("skipped_steps", pa.int32(), nullable=False),  # steps a wrapper left undrafted
        pa.field("drafted_tokens", pa.int32(), nullable=False),
        pa.field("accepted_tokens", pa.int32(), nullable=False),  # bonus token excluded
        pa.field("accept_lengths", pa.list_(pa.int16())),  # accepted drafts per step
        # seconds; draft/verify/commit are the sums over the steps this row took part in
        pa.field("prefill_s", pa.float64(), nullable=False),
        pa.field("draft_s", pa.float64(), nullable=False),
        pa.field("verify_s", pa.float64(), nullable=False),
        pa.field("commit_s", pa.float64(), nullable=False),
        pa.field("total_s", pa.float64(), nullable=False),  # batch start -> this row finished
        # which batch (serving: request stream) of the shard the row ran in, and its wall time
        pa.field("batch_index", pa.int32(), nullable=False),
        pa.field("batch_s", pa.float64(), nullable=False),
        # latency as a request sees it, seconds: when it arrived (after its batch or stream
        # started), how long it waited to be admitted, when its first token came (from arrival),
        # and when each output token was emitted (from arrival; tokens accepted in one step
        # share a time); null in older runs and imported ones
        pa.field("arrival_s", pa.float64()),
        pa.field("queue_s", pa.float64()),
        pa.field("ttft_s", pa.float64()),
        pa.field("token_times_s", pa.list_(pa.float64())),
        # the target's verification cost on the row's worker at the row's batch size, measured
        # before any timed window: verify_cost_s[i] is the seconds of one verify forward of
        # verify_cost_tokens[i] tokens per row (T ascending; methods/verify_cost.py says which
        # statistic of its rounds); null where not measured
        pa.field("verify_cost_tokens", pa.list_(pa.int32())),
        pa.field("verify_cost_s", pa.list_(pa.float64())),
        pa.field("output_tokens", pa.list_(pa.int32())),
        pa.field("output_sha256", pa.string()),
        pa.field("output_text", pa.string()),
        # telemetry
        pa.field("energy_j", pa.float64()),
        pa.field("peak_mem_bytes", pa.int64()),
        pa.field("device_name", pa.string()),
        pa.field("device_uuid", pa.string()),
        pa.field("host", pa.string()),
    ],
    metadata={"mmspec.schema_version": str(SCHEMA_VERSION)},
)


@dataclass
class ResultRow:
    """One row of RESULT_SCHEMA; field order and names match the schema exactly."""

    run_id: str
    cell_id: str
    shard_id: str
    model: str
    method: str
    # keyword-only, so they may sit here in schema order: "" means `method` itself
    base_method: str = field(default="", kw_only=True)
    method_args: str | None = field(default=None, kw_only=True)
    batch_size: int
    scenario: str = field(default="static", kw_only=True)
    rate: float | None = field(default=None, kw_only=True)
    temperature: float
    seed: int
    repeat: int
    workload: str
    topic: str
    category: str
    sample_id: str
    turn: int
    status: str = "ok"
    error: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    skipped_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accept_lengths: list[int] | None = field(default_factory=list)  # None: not recorded
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0
    batch_index: int = 0
    batch_s: float = 0.0
    arrival_s: float | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    token_times_s: list[float] | None = None
    verify_cost_tokens: list[int] | None = None  # None: not measured
    verify_cost_s: list[float] | None = None
    output_tokens: list[int] | None = field(default_factory=list)  # None: not recorded
    output_sha256: str | None = None
    output_text: str | None = None
    energy_j: float | None = None
    peak_mem_bytes: int | None = None
    device_name: str | None = None
    device_uuid: str | None = None
    host: str | None = None

    def __post_init__(self) -> None:
        if not self.base_method:
            self.base_method = self.method


def rows_to_table(rows: list[ResultRow]) -> pa.Table:
    """Build a table that conforms to RESULT_SCHEMA (raises if a row does not)."""
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in dataclasses.fields(ResultRow)}
    return pa.Table.from_pydict(columns, schema=RESULT_SCHEMA)


assert [f.name for f in dataclasses.fields(ResultRow)] == RESULT_SCHEMA.names
