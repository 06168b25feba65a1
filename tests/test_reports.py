"""mmspec.reports against a hand-built run: every metric is recomputed here in plain Python."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from mmspec.reports import (
    ALL_TOPIC,
    METRIC_COLUMNS,
    cell_metrics,
    load_rows,
    render_markdown,
    write_report,
)
from mmspec.results.schema import ResultRow
from tests import run_dirs

MODEL = "org/tiny-vl"
RUN_ID = "synthetic-run"
# (sample_id, topic, turn): s1 is a two-turn conversation, each turn its own row.
SAMPLES = [
    ("s1", "general vqa", 0),
    ("s1", "general vqa", 1),
    ("s2", "general vqa", 0),
    ("s3", "text vqa", 0),
    ("s4", "text vqa", 0),
]
MANIFEST = {
    "run_id": RUN_ID,
    "grid": {"name": "synthetic", "methods": ["ar", "pld"]},
    "grid_sha256": "abc123grid",
    "git_sha": "deadbeefcafe",
    "packages": {"polars": "2.1.0", "torch": "2.13.0", "ray": None},
    "host": "testhost",
    "git_dirty": False,
    "started_at": "2025-01-01T00:00:00Z",
}


def _row(method: str, bs: int, temp: float, repeat: int, i: int, **over: object) -> ResultRow:
    sid, topic, turn = SAMPLES[i]
    new = 20 + 3 * i
    ar_total = 0.05 * new * (1 + 0.1 * bs) + 0.01 * i + 0.003 * repeat
    if method == "ar":
        steps, accepted, drafted, total = new, 0, 0, ar_total
    else:
        # pld is built to be exactly (1.5 + 0.2 i) times faster than ar on sample i.
        steps = new // (2 + i % 2)
        accepted = new - steps
        drafted = accepted + 2 * steps
        total = ar_total / (1.5 + 0.2 * i)
    cell_id = f"{method}-b{bs}-t{temp}-r{repeat}"
    fields: dict[str, object] = dict(
        run_id=RUN_ID,
        cell_id=cell_id,
        shard_id=f"{cell_id}-{i % 2}",
        model=MODEL,
        method=method,
        batch_size=bs,
        temperature=temp,
        seed=0,
        repeat=repeat,
        workload="synthetic",
        topic=topic,
        category=topic,
        sample_id=sid,
        turn=turn,
        new_tokens=new,
        steps=steps,
        drafted_tokens=drafted,
        accepted_tokens=accepted,
        prefill_s=0.01 * (i + 1),
        draft_s=0.002 * i * (method != "ar"),
        verify_s=0.03 * steps,
        commit_s=0.001 * steps,
        total_s=total,
        output_sha256=f"sha-{sid}-{turn}-{temp}-{repeat}",
    )
    fields.update(over)
    return ResultRow(**fields)  # type: ignore[arg-type]


def _error(method: str, bs: int, temp: float, repeat: int, i: int) -> ResultRow:
    # Garbage numbers: if an error row leaked into any metric, the totals would show it.
    return _row(
        method,
        bs,
        temp,
        repeat,
        i,
        status="error",
        error="CUDA out of memory",
        new_tokens=1000,
        steps=1,
        accepted_tokens=999,
        drafted_tokens=999,
        total_s=999.0,
        output_sha256=None,
    )


def synthetic_rows() -> list[ResultRow]:
    rows: list[ResultRow] = []
    for bs in (1, 2):
        for method in ("ar", "pld"):
            rows += [_row(method, bs, 0.0, 0, i) for i in range(len(SAMPLES))]
    # Errors: pld fails s4 at batch size 1; ar fails s3 at batch size 2 (pld's s3 then has no
    # baseline and must drop out of speedup and lossless, but not out of MAT).
    failed = {(1, "pld", "s4"), (2, "ar", "s3")}
    rows = [r for r in rows if (r.batch_size, r.method, r.sample_id) not in failed]
    rows += [_error("pld", 1, 0.0, 0, 4), _error("ar", 2, 0.0, 0, 3)]
    # One lossless mismatch: pld at batch size 2 emits other tokens for s2.
    for r in rows:
        if r.method == "pld" and r.batch_size == 2 and r.sample_id == "s2":
            r.output_sha256 = "sha-different"
    # A second repeat of batch size 1 (pooled with repeat 0), and a sampled cell.
    rows += [_row(m, 1, 0.0, 1, i) for m in ("ar", "pld") for i in (2, 3)]
    rows += [_row(m, 1, 0.7, 0, i) for m in ("ar", "pld") for i in (0, 3)]
    for r in rows:
        if r.temperature == 0.7 and r.method == "pld":
            r.output_sha256 = f"sampled-{r.sample_id}"
    return rows


def write_run(run_dir: Path, rows: list[ResultRow], manifest: dict | None = None) -> Path:
    return run_dirs.write_run(run_dir, rows, manifest or MANIFEST)


# ---------------------------------------------------------------- independent reference


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def reference(rows: list[ResultRow]) -> dict[tuple, dict[str, object]]:
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    for r in rows:
        for topic in (r.topic, ALL_TOPIC):
            groups[(r.model, r.method, r.batch_size, r.temperature, topic)].append(r)
    out: dict[tuple, dict[str, object]] = {}
    for key, members in groups.items():
        model, method, bs, temp, topic = key
        ok = [r for r in members if r.status == "ok"]
        steps = sum(r.steps for r in ok)
        acc = sum(r.accepted_tokens for r in ok)
        drafted = sum(r.drafted_tokens for r in ok)
        total = sum(r.total_s for r in ok)
        lat = [r.total_s for r in ok]
        ar_ok = {
            (r.workload, r.sample_id, r.turn, r.repeat): r
            for r in groups.get((model, "ar", bs, temp, topic), [])
            if r.status == "ok"
        }
        pairs = [
            (r, ar_ok[(r.workload, r.sample_id, r.turn, r.repeat)])
            for r in ok
            if (r.workload, r.sample_id, r.turn, r.repeat) in ar_ok
        ]
        if not pairs:
            sg = sp = loss = None
        elif method == "ar":
            sg = sp = 1.0
            loss = 1.0 if temp == 0 else None
        else:
            sg = sum(a.total_s for _, a in pairs) / sum(m.total_s for m, _ in pairs)
            sp = sum(a.total_s / m.total_s for m, a in pairs) / len(pairs)
            same = sum(m.output_sha256 == a.output_sha256 for m, a in pairs) / len(pairs)
            loss = same if temp == 0 else None
        out[key] = {
            "samples": len(ok),
            "errors": len(members) - len(ok),
            "new_tokens": sum(r.new_tokens for r in ok),
            "steps": steps,
            "skipped_steps": sum(r.skipped_steps for r in ok),
            "accepted_tokens": acc,
            "drafted_tokens": drafted,
            "MAT": acc / steps if steps else None,
            "MAT_with_bonus": (acc + steps) / steps if steps else None,
            "accept_rate": acc / drafted if drafted else None,
            "tokens_per_s": sum(r.new_tokens for r in ok) / total if total else None,
            "latency_p50_s": _quantile(lat, 0.5) if lat else None,
            "latency_p90_s": _quantile(lat, 0.9) if lat else None,
            "prefill_s_mean": sum(r.prefill_s for r in ok) / len(ok) if ok else None,
            "draft_s_mean": sum(r.draft_s for r in ok) / len(ok) if ok else None,
            "verify_s_mean": sum(r.verify_s for r in ok) / len(ok) if ok else None,
            "commit_s_mean": sum(r.commit_s for r in ok) / len(ok) if ok else None,
            "paired_keys": len(pairs),
            "speedup_global": sg,
            "speedup_paired": sp,
            "lossless": loss,
        }
    return out


def _by_key(metrics: pl.DataFrame) -> dict[tuple, dict[str, object]]:
    return {
        (r["model"], r["method"], r["batch_size"], r["temperature"], r["topic"]): r
        for r in metrics.iter_rows(named=True)
    }


def _assert_matches_reference(metrics: pl.DataFrame, rows: list[ResultRow]) -> None:
    expected = reference(rows)
    got = _by_key(metrics)
    assert set(got) == set(expected)
    assert metrics.height == len(expected)
    for key, want in expected.items():
        for col, value in want.items():
            actual = got[key][col]
            if value is None:
                assert actual is None, (key, col, actual)
            elif isinstance(value, int) and not isinstance(value, bool):
                assert actual == value, (key, col, actual, value)
            else:
                assert actual == pytest.approx(value, rel=1e-12), (key, col, actual, value)


# ---------------------------------------------------------------- tests


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", synthetic_rows())


def test_metrics_match_plain_python_reference(run_dir: Path) -> None:
    metrics = cell_metrics(load_rows(run_dir))
    assert metrics.columns == METRIC_COLUMNS
    _assert_matches_reference(metrics, synthetic_rows())


def test_metrics_exact_numbers(run_dir: Path) -> None:
    m = _by_key(cell_metrics(load_rows(run_dir)))
    pld2 = m[(MODEL, "pld", 2, 0.0, ALL_TOPIC)]
    # ar failed s3, so 4 of pld's 5 ok rows are paired; s2 differs -> 3/4 lossless.
    assert (pld2["samples"], pld2["errors"], pld2["paired_keys"]) == (5, 0, 4)
    assert pld2["lossless"] == 0.75
    assert m[(MODEL, "pld", 2, 0.0, "general vqa")]["lossless"] == pytest.approx(2 / 3)
    text2 = m[(MODEL, "pld", 2, 0.0, "text vqa")]
    assert text2["lossless"] == 1.0
    # Only s4 (i=4) is paired: pld was built 1.5 + 0.2*4 = 2.3x faster on it.
    assert text2["speedup_global"] == pytest.approx(2.3)
    assert text2["speedup_paired"] == pytest.approx(2.3)
    # MAT still counts s3 (i=3: 29 tokens, 9 steps) and s4 (32 tokens, 16 steps).
    assert text2["MAT"] == pytest.approx(36 / 25)
    assert text2["MAT_with_bonus"] == pytest.approx(61 / 25)
    # The error row lives in the ar cell; it is counted, not averaged.
    ar2 = m[(MODEL, "ar", 2, 0.0, ALL_TOPIC)]
    assert (ar2["samples"], ar2["errors"]) == (4, 1)
    assert (ar2["speedup_global"], ar2["speedup_paired"], ar2["lossless"]) == (1.0, 1.0, 1.0)
    assert ar2["MAT"] == 0.0 and ar2["MAT_with_bonus"] == 1.0
    # Batch size 1 pools repeats 0 and 1: 4 + 2 ok rows, the errored s4 excluded.
    pld1 = m[(MODEL, "pld", 1, 0.0, ALL_TOPIC)]
    assert (pld1["samples"], pld1["errors"], pld1["paired_keys"]) == (6, 1, 6)
    assert pld1["lossless"] == 1.0
    # Sampling: no lossless claim either way, speedup still measured.
    sampled = m[(MODEL, "pld", 1, 0.7, ALL_TOPIC)]
    assert sampled["lossless"] is None
    assert m[(MODEL, "ar", 1, 0.7, ALL_TOPIC)]["lossless"] is None
    assert sampled["speedup_paired"] == pytest.approx((1.5 + 2.1) / 2)


def test_metrics_are_reproducible(run_dir: Path) -> None:
    # Parallel joins reorder rows; float sums must not change in the last bit between rebuilds.
    first = cell_metrics(load_rows(run_dir))
    for _ in range(20):
        assert cell_metrics(load_rows(run_dir)).equals(first)


def test_missing_output_hash_is_a_mismatch(tmp_path: Path) -> None:
    # No hash proves nothing: it must not pass as lossless.
    rows = [_row("ar", 1, 0.0, 0, i) for i in range(4)]
    rows += [_row("pld", 1, 0.0, 0, i, output_sha256=None if i == 0 else "x") for i in range(4)]
    rows[-1].output_sha256 = rows[3].output_sha256
    m = _by_key(cell_metrics(load_rows(write_run(tmp_path / "h", rows))))
    assert m[(MODEL, "pld", 1, 0.0, ALL_TOPIC)]["lossless"] == 0.25


def test_latency_quantiles_are_linear(tmp_path: Path) -> None:
    # Four latencies 1, 2, 3, 10: p50 = 2.5, p90 = 3 + 0.7 * 7 = 7.9 (linear interpolation).
    latencies = [3.0, 1.0, 10.0, 2.0]
    rows = [_row("ar", 1, 0.0, 0, i, total_s=t) for i, t in enumerate(latencies)]
    m = _by_key(cell_metrics(load_rows(write_run(tmp_path / "q", rows))))
    total = m[(MODEL, "ar", 1, 0.0, ALL_TOPIC)]
    assert total["latency_p50_s"] == pytest.approx(2.5)
    assert total["latency_p90_s"] == pytest.approx(7.9)


def test_report_flags_lossless_failure(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    text = path.read_text()
    first = text.splitlines()[0]
    assert "Lossless: FAILED" in first
    assert "pld on org/tiny-vl (batch size 2, T=0): 75.0% of 4 identical" in first
    assert "batch size 1" not in first
    assert "Error rows: 2." in first
    for label in ("MAT incl. bonus", "Speedup (global)", "Speedup (paired)", "Spec-Bench"):
        assert label in text
    metadata = ("deadbeefcafe", "abc123grid", "testhost", "| polars | 2.1.0 |", "| ray | not ins")
    for value in (*metadata, RUN_ID):
        assert value in text
    assert "## org/tiny-vl · T=0 · batch size 2" in text
    saved = pl.read_ipc(run_dir / "metrics.arrow")
    assert saved.equals(cell_metrics(load_rows(run_dir)))
    assert (run_dir / "metrics.csv").exists()


def test_report_passes_when_all_lossless(tmp_path: Path) -> None:
    rows = [r for r in synthetic_rows() if r.output_sha256 != "sha-different"]
    text = write_report(write_run(tmp_path / "ok", rows)).read_text()
    # Two greedy pld cells are checked (batch sizes 1 and 2); the sampled cell is not.
    assert text.splitlines()[0] == "**Lossless: all 2 checks passed.** Error rows: 2."


def test_run_without_ar(tmp_path: Path) -> None:
    rows = [r for r in synthetic_rows() if r.method != "ar"]
    run = write_run(tmp_path / "noar", rows)
    metrics = cell_metrics(load_rows(run))
    _assert_matches_reference(metrics, rows)
    assert metrics["speedup_global"].null_count() == metrics.height
    assert metrics["lossless"].null_count() == metrics.height
    assert set(metrics["paired_keys"].to_list()) == {0}
    text = write_report(run).read_text()
    assert text.splitlines()[0].startswith("**Lossless: not checked**")
    assert "| pld |" in text


def test_run_with_only_errors(tmp_path: Path) -> None:
    rows = [_error(m, 1, 0.0, 0, i) for m in ("ar", "pld") for i in range(3)]
    run = write_run(tmp_path / "err", rows)
    metrics = cell_metrics(load_rows(run))
    _assert_matches_reference(metrics, rows)
    assert metrics.filter(pl.col("topic") == ALL_TOPIC)["errors"].to_list() == [3, 3]
    assert metrics["MAT"].null_count() == metrics.height
    first = write_report(run).read_text().splitlines()[0]
    assert "not checked" in first and "Error rows: 6." in first


def test_empty_run_renders(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    metrics = cell_metrics(load_rows(run))
    assert metrics.height == 0 and metrics.columns == METRIC_COLUMNS
    text = render_markdown(metrics, {})
    assert text.startswith("**No result rows.**")


def test_other_schema_version_is_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path / "v", [_row("ar", 1, 0.0, 0, 0)])
    path = next((run / "results").rglob("*.arrow"))
    table = pa.ipc.open_file(str(path)).read_all()
    old = table.replace_schema_metadata({"mmspec.schema_version": "0"})
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, old.schema) as writer:
        writer.write_table(old)
    with pytest.raises(ValueError, match="schema version"):
        load_rows(run)


def test_duplicated_baseline_row_fails_loudly(tmp_path: Path) -> None:
    # A shard counted twice would skew every ratio; better an error than a quiet wrong number.
    rows = [_row("ar", 1, 0.0, 0, 0), _row("pld", 1, 0.0, 0, 0)]
    dup = _row("ar", 1, 0.0, 0, 0, shard_id="again")
    run = write_run(tmp_path / "dup", [*rows, dup])
    with pytest.raises(pl.exceptions.PolarsError):
        cell_metrics(load_rows(run))


def test_viskip_section_sets_each_wrapped_cell_beside_its_method(tmp_path: Path) -> None:
    from mmspec.reports.html import render_html
    from mmspec.reports.metrics import run_details

    rows = [_row(m, 1, 0.0, 0, i) for m in ("ar", "pld") for i in range(len(SAMPLES))]
    # viskip+pld: the same work as pld, 40% slower per row, a third of its steps skipped
    skip_rows = [_row("viskip+pld", 1, 0.0, 0, i) for i in range(len(SAMPLES))]
    for r in skip_rows:
        r.skipped_steps = r.steps // 3
        r.total_s *= 1.4
    run = write_run(tmp_path / "run", rows + skip_rows)
    frame = load_rows(run)
    metrics, details = cell_metrics(frame), run_details(frame)
    text = render_markdown(metrics, MANIFEST, details)
    section = text[text.index("## ViSkip") :].split("\n## ")[0]
    [line] = [x for x in section.splitlines() if x.startswith("| viskip+pld |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    pooled = {
        r["method"]: r for r in metrics.filter(pl.col("topic") == ALL_TOPIC).iter_rows(named=True)
    }
    share = sum(r.skipped_steps for r in skip_rows) / sum(r.steps for r in skip_rows)
    assert cells[1] == "1" and cells[2] == f"{100 * share:.1f}%"
    assert cells[3] == f"{pooled['pld']['MAT']:.2f} → {pooled['viskip+pld']['MAT']:.2f}"
    assert cells[-1] == f"{1 / 1.4:.2f}×"  # same tokens in 1.4x the time
    html = render_html(metrics, MANIFEST, details)
    assert 'id="viskip"' in html and f"{1 / 1.4:.2f}×" in html
    # a run without ViSkip cells has no such section
    plain = write_run(tmp_path / "plain", rows)
    frame = load_rows(plain)
    assert "## ViSkip" not in render_markdown(cell_metrics(frame), MANIFEST, run_details(frame))


def test_report_md_escapes_run_text_and_groups_errors_without_addresses(tmp_path: Path) -> None:
    model, topic = "org/<b>vl</b>", "<script>alert(1)</script>"
    pil = "UnidentifiedImageError: cannot identify image file <_io.BytesIO object at {}>"
    rows = [_row(m, 1, 0.0, 0, i, model=model) for m in ("ar", "pld") for i in (0, 1, 2)]
    rows[0].topic = topic
    # one failure, three memory addresses: one line of the Errors table, not three
    rows += [
        _row("pld", 1, 0.0, 0, i, model=model, status="error", error=pil.format(address))
        for i, address in ((3, "0x7f3a2b1c4d50"), (4, "0x7f3a2b1c9e10"))
    ]
    rows.append(
        _row("ar", 1, 0.0, 0, 3, model=model, status="error", error=pil.format("0x55d1c0ffee00"))
    )
    rows.append(
        _row(
            "ar",
            1,
            0.0,
            0,
            4,
            model=model,
            status="error",
            error="sample <img src=x onerror=alert(1)> | broken",
        )
    )
    text = write_report(write_run(tmp_path / "run", rows)).read_text()
    for raw in (model, topic, "<_io", "<img", "0x7f3a", "0x55d1"):
        assert raw not in text
    assert "## org/&lt;b&gt;vl&lt;/b&gt; · T=0 · batch size 1" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    errors = text[text.index("## Errors") :].split("\n## ")[0]
    table = [line for line in errors.splitlines() if line.startswith("| org/")]
    grouped = pil.format("0x…").replace("<", "&lt;").replace(">", "&gt;")
    assert sorted(table) == [
        f"| org/&lt;b&gt;vl&lt;/b&gt; | ar | 1 | 0 | {grouped} | 1 |",
        "| org/&lt;b&gt;vl&lt;/b&gt; | ar | 1 | 0 | sample &lt;img src=x onerror=alert(1)&gt; "
        "\\| broken | 1 |",
        f"| org/&lt;b&gt;vl&lt;/b&gt; | pld | 1 | 0 | {grouped} | 2 |",
    ]


def test_error_messages_lose_per_object_noise() -> None:
    from mmspec.reports.metrics import error_message

    texts = [
        "cannot identify image file <_io.BytesIO object at 0x7f3a2b1c4d50>",
        "The actor 3f2a9c0d1e2b3c4d5e6f708192a3b4c5 died (pid=1234, ip=10.0.0.1)",
        "task 123e4567-e89b-12d3-a456-426614174000 lost",
        "CUDA out of memory",
    ]
    frame = pl.DataFrame({"error": [*texts, None]})
    assert frame.select(error_message(pl.col("error")))["error"].to_list() == [
        "cannot identify image file <_io.BytesIO object at 0x…>",
        "The actor … died (pid=…, ip=10.0.0.1)",
        "task … lost",
        "CUDA out of memory",
        None,
    ]
