"""Variants in the reports (issue 18): grouped under their method, the best setting per batch
size, speedup over a swept argument, ViSkip pairs per threshold; compare and history match
methods by what ran; runs written before variants (schema 1) still read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from mmspec.reports.build import write_report
from mmspec.reports.compare import compare_runs, render_comparison
from mmspec.reports.history import add_run, load_history, render_trends, trends
from mmspec.reports.html import render_html
from mmspec.reports.markdown import families, merged_cells, method_order, render_markdown
from mmspec.reports.metrics import ALL_TOPIC, cell_metrics, load_rows, run_details
from mmspec.reports.variants import best_per_batch, sweeps, variant_groups
from mmspec.reports.viskip import viskip_rows
from mmspec.results.ids import method_id
from mmspec.results.layout import RESULTS, part_name, partition
from mmspec.results.schema import RESULT_SCHEMA, ResultRow, rows_to_table
from mmspec.results.variants import METHOD_VARIANTS, Variant, canonical_args
from tests.test_compare import MODEL, make_rows, write_run

LOW, MID, HIGH = (f"viskip+pld[viskip_threshold={t}]" for t in ("0.2", "0.35", "0.5"))
# name -> (registered method, resolved arguments)
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "ar": ("ar", {}),
    "eagle2": ("eagle2", {"depth": 3, "top_k": 8, "threshold": 0.3}),
    "pld": ("pld", {"ngram": 4, "num_pred": 10}),
    "eagle2-wide": ("eagle2", {"depth": 5, "top_k": 10, "threshold": 0.3}),
    **{
        name: ("viskip+pld", {"ngram": 4, "num_pred": 10, "viskip_threshold": t})
        for name, t in ((LOW, 0.2), (MID, 0.35), (HIGH, 0.5))
    },
}
# (name, batch size) -> factor on its times: eagle2-wide wins at batch size 1, loses at 4;
# ViSkip's speed rises with its threshold
FACTOR = {
    ("eagle2-wide", 1): 0.5,
    ("eagle2-wide", 4): 2.0,
    (LOW, 1): 1.3,
    (LOW, 4): 1.3,
    (MID, 1): 1.1,
    (MID, 4): 1.2,
}


def sweep_rows(run_id: str = "run", settings: dict[str, Any] | None = None) -> list[ResultRow]:
    settings = SETTINGS if settings is None else settings
    rows = make_rows(run_id, samples=20, methods=tuple(settings), batch_sizes=(1, 4))
    return [
        replace(
            r,
            # ids as the grid makes them (a variant's name is not a path part)
            cell_id=r.cell_id.replace(r.method, method_id(r.method)),
            shard_id=r.shard_id.replace(r.method, method_id(r.method)),
            base_method=settings[r.method][0],
            method_args=canonical_args(settings[r.method][1]),
            total_s=r.total_s * FACTOR.get((r.method, r.batch_size), 1.0),
        )
        for r in rows
    ]


def variants_manifest(settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    settings = SETTINGS if settings is None else settings
    return [Variant(n, m, a, a).to_dict() for n, (m, a) in settings.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(
        tmp_path_factory.mktemp("sweep") / "run",
        sweep_rows(),
        **{METHOD_VARIANTS: variants_manifest()},
    )


def pooled(run: Path) -> Any:
    metrics = cell_metrics(load_rows(run))
    return metrics.filter(metrics["topic"] == ALL_TOPIC)


# ----------------------------------------------------------------------------- the report


def test_variants_are_grouped_under_their_method(run: Path) -> None:
    metrics = cell_metrics(load_rows(run))
    manifest = {METHOD_VARIANTS: variants_manifest()}
    # the grid lists eagle2-wide after pld; the report puts it under eagle2
    assert method_order(metrics, manifest) == ["ar", "eagle2", "eagle2-wide", "pld", LOW, MID, HIGH]
    text = render_markdown(metrics, manifest)
    per_method = text.split("Per method, all topics pooled:")[1]
    assert per_method.index("| eagle2 |") < per_method.index("| eagle2-wide |")
    assert per_method.index("| eagle2-wide |") < per_method.index("| pld |")
    # every row keeps what ran beside its name
    row = metrics.filter((metrics["method"] == "eagle2-wide") & (metrics["topic"] == ALL_TOPIC))
    assert row["base_method"].unique().to_list() == ["eagle2"]
    assert '"depth":5' in row["method_args"][0]


def test_best_setting_per_batch_size(run: Path) -> None:
    groups = {g.method: g for g in variant_groups(pooled(run), list(SETTINGS))}
    assert set(groups) == {"eagle2", "viskip+pld"}  # pld and ar ran under one name each
    tree = groups["eagle2"]
    assert tree.names == ("eagle2", "eagle2-wide")
    assert tree.varying == ("depth", "top_k")  # threshold is the same in both
    assert tree.label("eagle2-wide") == "depth=5, top_k=10"
    best = {b.batch_size: b for b in best_per_batch(tree)}
    assert (best[1].name, best[4].name) == ("eagle2-wide", "eagle2")
    assert best[1].settings == 2
    assert best[1].row["speedup_global"] > best[4].row["speedup_global"]
    assert best[1].row["MAT"] is not None and best[1].row["latency_p50_s"] is not None
    viskip = {b.batch_size: b.name for b in best_per_batch(groups["viskip+pld"])}
    assert viskip == {1: HIGH, 4: HIGH}


def test_markdown_has_the_variants_section(run: Path) -> None:
    metrics = cell_metrics(load_rows(run))
    text = render_markdown(metrics, {METHOD_VARIANTS: variants_manifest()})
    section = text.split("## Method variants")[1].split("\n## ")[0]
    assert f"{MODEL} · T=0 · eagle2: best setting per batch size:" in section
    assert "| 1 | eagle2-wide | depth=5, top_k=10 |" in section
    assert "| 4 | eagle2 | depth=3, top_k=8 |" in section
    assert f"| {HIGH} | viskip_threshold=0.5 |" in section
    assert "pld:" not in section.replace("viskip+pld:", "")


def test_html_charts_speedup_over_the_swept_argument(run: Path) -> None:
    groups = {g.method: g for g in variant_groups(pooled(run), list(SETTINGS))}
    assert sweeps(groups["eagle2"]) == []  # depth and top_k move together: no one-arg line
    [threshold] = sweeps(groups["viskip+pld"])
    assert threshold.arg == "viskip_threshold"
    assert [ln.label for ln in threshold.lines] == ["batch size 1", "batch size 4"]
    assert threshold.lines[0].xs == (0.2, 0.35, 0.5)
    ys = threshold.lines[0].ys
    assert ys[0] < ys[1] < ys[2]
    metrics = cell_metrics(load_rows(run))
    page = render_html(metrics, {METHOD_VARIANTS: variants_manifest()}, run_details(load_rows(run)))
    section = page.split('<section id="variants">')[1].split("</section>")[0]
    assert "speedup over viskip_threshold" in section
    assert section.count("<svg") == 1
    assert '<a href="#variants">Method variants</a>' in page


def test_viskip_pairs_each_threshold_with_its_method(run: Path) -> None:
    rows = load_rows(run)
    merged = merged_cells(cell_metrics(rows), run_details(rows))
    found = viskip_rows(merged)
    assert {(r.name, r.batch_size) for r in found} == {
        (n, b) for n in (LOW, MID, HIGH) for b in (1, 4)
    }
    assert {r.method for r in found} == {"pld"}


def test_a_variant_the_manifest_does_not_place_takes_its_methods_family(run: Path) -> None:
    found = families(cell_metrics(load_rows(run)), {})
    assert found["eagle2-wide"] == found["eagle2"] and found["eagle2"] is not None
    assert found[LOW] is not None and found[LOW].vision_aware


def test_write_report_of_a_sweep(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "r", sweep_rows(), **{METHOD_VARIANTS: variants_manifest()})
    report = write_report(run_dir).read_text()
    assert "## Method variants" in report and "## ViSkip" in report


# ----------------------------------------------------------------------------- older runs


def _write_v1(run_dir: Path, rows: list[ResultRow]) -> None:
    """Part files as schema version 1 wrote them: no base_method, no method_args."""
    old_fields = [f for f in RESULT_SCHEMA if f.name not in ("base_method", "method_args")]
    old = pa.schema(old_fields, metadata={"mmspec.schema_version": "1"})
    by_shard: dict[tuple[Any, ...], list[ResultRow]] = {}
    for r in rows:
        by_shard.setdefault((r.method, r.batch_size, r.shard_id), []).append(r)
    for (method, bs, shard), part in by_shard.items():
        path = run_dir / RESULTS / partition(MODEL, method, bs, 0.0, 0) / part_name(shard + "-v1")
        path.parent.mkdir(parents=True, exist_ok=True)
        table = rows_to_table(part).select(old.names).cast(old)
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, old) as writer:
            writer.write_table(table)


def test_a_run_from_schema_1_reads_and_reports(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "old", [])
    _write_v1(run_dir, make_rows("old", samples=10))
    rows = load_rows(run_dir).collect()
    assert rows.columns == RESULT_SCHEMA.names
    assert (rows["base_method"] == rows["method"]).all()
    assert rows["method_args"].null_count() == rows.height
    assert "## Method variants" not in write_report(run_dir).read_text()


def test_a_run_resumed_after_the_upgrade_reads_both_versions(tmp_path: Path) -> None:
    rows = make_rows("mixed", samples=10)
    run_dir = write_run(tmp_path / "mixed", [r for r in rows if r.method == "ar"])
    _write_v1(run_dir, [r for r in rows if r.method == "pld"])
    metrics = cell_metrics(load_rows(run_dir))
    pld = metrics.filter((metrics["method"] == "pld") & (metrics["topic"] == ALL_TOPIC))
    assert pld["speedup_global"][0] > 1


# ----------------------------------------------------------------------------- compare, history


RENAMED = {("eagle2-big" if n == "eagle2-wide" else n): s for n, s in SETTINGS.items()}


def test_compare_matches_a_renamed_variant_by_its_arguments(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", sweep_rows("base"))
    new = write_run(tmp_path / "new", sweep_rows("new", RENAMED))
    result = compare_runs(base, new)
    assert not result.hard_failures and not result.only_base and not result.only_new
    wide = next(c for c in result.cells if c.key.name == "eagle2-big")
    assert wide.key.method == "eagle2" and '"depth":5' in wide.key.setting


def test_compare_tells_two_settings_under_one_name_apart(tmp_path: Path) -> None:
    changed = dict(SETTINGS)
    changed["eagle2-wide"] = ("eagle2", {"depth": 6, "top_k": 10, "threshold": 0.3})
    base = write_run(tmp_path / "base", sweep_rows("base"))
    new = write_run(tmp_path / "new", sweep_rows("new", changed))
    result = compare_runs(base, new)
    assert {k.name for k in result.only_base} == {"eagle2-wide"}
    assert {k.name for k in result.only_new} == {"eagle2-wide"}
    assert [f.kind for f in result.hard_failures] == ["missing", "missing"]  # batch sizes 1, 4


def test_compare_with_a_run_from_before_variants_matches_by_name(tmp_path: Path) -> None:
    plain = {n: SETTINGS[n] for n in ("ar", "eagle2", "pld")}
    old = write_run(tmp_path / "old", [])
    _write_v1(old, make_rows("old", samples=20, methods=tuple(plain), batch_sizes=(1, 4)))
    new = write_run(tmp_path / "new", sweep_rows("new", plain))
    result = compare_runs(old, new)
    assert not result.hard_failures and not result.only_base and not result.only_new
    assert "BASE did not record method arguments" in render_comparison(result)


def test_history_follows_a_method_by_what_ran(tmp_path: Path) -> None:
    plain = {n: SETTINGS[n] for n in ("ar", "eagle2", "eagle2-wide")}
    renamed = {("eagle2-big" if n == "eagle2-wide" else n): s for n, s in plain.items()}
    store = tmp_path / "store"
    old = write_run(tmp_path / "r0", [], started_at="2026-01-01T00:00:00+00:00")
    _write_v1(old, make_rows("r0", samples=20, methods=("ar", "eagle2"), batch_sizes=(1, 4)))
    runs = [old]
    for night, settings in enumerate((plain, renamed), start=1):
        rows = sweep_rows(f"r{night}", settings)
        started = f"2026-01-0{night + 1}T00:00:00+00:00"
        runs.append(write_run(tmp_path / f"r{night}", rows, started_at=started))
    for run_dir in runs:
        add_run(run_dir, store)
    found = {
        (t.key["method"], t.key["batch_size"]): t
        for t in trends(load_history(store))
        if t.key["method"] != "ar"
    }
    # eagle2: the run from before variants joins the series; the renamed variant is one series
    assert len(found[("eagle2", 1)].values) == 3
    assert len(found[("eagle2-big", 1)].values) == 2
    assert set(found) == {(m, b) for m in ("eagle2", "eagle2-big") for b in (1, 4)}


def test_history_shows_a_changed_setting_as_its_own_series(tmp_path: Path) -> None:
    before = {n: SETTINGS[n] for n in ("ar", "eagle2")}
    after = {**before, "eagle2": ("eagle2", {"depth": 4, "top_k": 8, "threshold": 0.3})}
    store = tmp_path / "store"
    for night, settings in enumerate((before, after)):
        started = f"2026-01-0{night + 1}T00:00:00+00:00"
        run_dir = write_run(
            tmp_path / f"r{night}", sweep_rows(f"r{night}", settings), started_at=started
        )
        add_run(run_dir, store)
    found = [t for t in trends(load_history(store)) if t.key["method"] == "eagle2"]
    assert sorted(len(t.values) for t in found) == [1, 1, 1, 1]  # 2 settings x 2 batch sizes
    text = render_trends(found, "speedup_global", 10, 0.05)
    assert text.count("| eagle2 (args ") == 4
