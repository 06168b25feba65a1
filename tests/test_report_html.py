"""report.html: self-contained, verdict first, and rendered by headless Chromium with every table
and every plot on screen (sizes measured in the browser, plus a screenshot that is not blank).

Two runs: hand-built rows (a lossless failure, error rows, partial telemetry) and a small real
run (tiny model, MMSpec testmini, `ar` and `pld` at batch sizes 1 and 2). Where no Chromium is
installed the browser tests skip and say so; the static checks run everywhere.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from PIL import Image

from mmspec.reports import load_rows, write_report
from mmspec.reports.metrics import CDF_QUANTILES, CELL_KEYS, cell_metrics, run_details
from mmspec.results.schema import ResultRow
from tests.conftest import mmspec_split
from tests.test_reports import _quantile, synthetic_rows, write_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1800",
]
# Runs at the end of <body> of a copy of the page: measures what the browser laid out and
# leaves the numbers in the DOM for --dump-dom to carry out.
PROBE = """
<script>
(() => {
  const shown = (el) => {
    const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const drawn = (svg) => [...svg.querySelectorAll("polyline, rect, circle")].filter((el) => {
    const b = el.getBBox(); return b.width > 0 || b.height > 0; }).length;
  const tables = [...document.querySelectorAll("table")];
  const plots = [...document.querySelectorAll("svg.plot")];
  const summary = {
    mode: document.compatMode,
    first_line: document.body.innerText.trim().split("\\n")[0],
    tables: tables.length,
    tables_shown: tables.filter(shown).length,
    rows_shown: [...document.querySelectorAll("tbody tr")].filter(shown).length,
    plots: plots.map((svg) => ({
      kind: svg.dataset.kind,
      title: svg.querySelector("title").textContent,
      width: svg.getBoundingClientRect().width,
      height: svg.getBoundingClientRect().height,
      series: svg.querySelectorAll("g.series, g.bar").length,
      drawn: drawn(svg),
    })),
  };
  const out = document.createElement("pre");
  out.id = "render-summary";
  out.textContent = JSON.stringify(summary);
  document.body.appendChild(out);
})();
</script>
"""


def find_browser() -> str | None:
    """A Chromium-family browser on PATH (or Debian's /usr/bin/chromium), else None."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        pytest.skip(
            "no Chromium found (looked for " + ", ".join(BROWSERS) + "); report.html is not "
            "render-tested here. Install it with: apt-get install chromium chromium-driver"
        )
    return path


def _chromium(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    result = subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def render_summary(browser: str, page: Path, tmp: Path) -> dict:
    """Open a probed copy of `page` and return what the browser measured."""
    probed = tmp / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(browser, tmp, "--dump-dom", probed.as_uri()).stdout
    found = re.search(r'<pre id="render-summary">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; DOM starts: {dom[:500]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(browser: str, page: Path, tmp: Path) -> Image.Image:
    shot = tmp / "page.png"
    _chromium(browser, tmp, f"--screenshot={shot}", page.as_uri())
    return Image.open(shot).convert("RGB")


def _model_chunks(md: str, heading: str) -> list[str]:
    """The per-(model, temperature) parts ("<model> · T=<t>:" onwards) of a `## heading`."""
    found = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", md, re.M | re.S)
    if found is None:
        return []
    return re.split(r"^.+ · T=\S+:$", found.group(1), flags=re.M)[1:]


def expected_plots(metrics_md: str) -> int:
    """Per (model, temperature): a speedup plot, the taxonomy groups' plot where a group has a
    speedup, the throughput-vs-latency plot where there is a throughput speedup; per batch
    size a CDF and a breakdown, and two acceptance plots where steps were recorded."""
    blocks = re.findall(r"^## (.+) · T=(\S+) · batch size \d+$", metrics_md, re.M)
    families = [
        c
        for c in _model_chunks(metrics_md, "Speedup (global) vs batch size")
        if re.search(r"^\| [^|]+: geometric mean \|.*\d×", c, re.M)
    ]
    throughput = [
        c
        for c in _model_chunks(metrics_md, "Throughput vs latency")
        if "No throughput speedup here" not in c
    ]
    acceptance = metrics_md.count("\nAcceptance per draft position (vLLM's definition")
    return len(set(blocks)) + len(families) + len(throughput) + 2 * len(blocks) + 2 * acceptance


def check_rendered(summary: dict, md: str) -> None:
    assert summary["mode"] == "CSS1Compat"  # the verdict comment before <!DOCTYPE> is harmless
    assert summary["tables"] >= 3 and summary["tables_shown"] == summary["tables"]
    assert summary["rows_shown"] > 0
    plots = summary["plots"]
    assert len(plots) == expected_plots(md), [p["title"] for p in plots]
    for plot in plots:
        assert plot["width"] > 300 and plot["height"] > 100, plot
        assert plot["series"] >= 1 and plot["drawn"] >= 1, plot


# ---------------------------------------------------------------- runs


def _telemetry_decoy(run: Path) -> None:
    # A telemetry series sits beside results (other schema): it must never be read as rows.
    folder = run / "telemetry" / "model=org--tiny-vl" / "method=ar"
    folder.mkdir(parents=True)
    table = pa.table({"t": [0.0, 0.05], "power_w": [61.0, 63.5]})
    with (
        pa.OSFile(str(folder / "part-x.arrow"), "wb") as sink,
        ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)


def _failing_rows() -> list[ResultRow]:
    """test_reports' rows (a lossless failure, two error rows) with partial telemetry."""
    rows = synthetic_rows()
    # Energy on the batch-size-1 rows only (one missing), memory everywhere but one cell.
    for i, r in enumerate(rows):
        if r.batch_size == 1 and r.status == "ok" and i != 3:
            r.energy_j = 20.0 + i
        if not (r.method == "ar" and r.batch_size == 2):
            r.peak_mem_bytes = 3 * 2**30 + i * 2**20
    return rows


@pytest.fixture
def failing_run(tmp_path: Path) -> Path:
    run = write_run(tmp_path / "run", _failing_rows())
    _telemetry_decoy(run)
    return run


def test_run_details_match_plain_python(failing_run: Path) -> None:
    rows = _failing_rows()
    details = run_details(load_rows(failing_run))
    # The per-request tail is a cell metric (metrics.csv), beside p50 and p90.
    pooled = cell_metrics(load_rows(failing_run)).filter(pl.col("topic") == "all")
    p99 = {tuple(r[k] for k in CELL_KEYS): r["latency_p99_s"] for r in pooled.iter_rows(named=True)}
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        cells[(r.model, r.method, r.batch_size, r.temperature)].append(r)
    got = {tuple(r[k] for k in CELL_KEYS): r for r in details.cells.iter_rows(named=True)}
    assert set(got) == {k for k, v in cells.items() if any(r.status == "ok" for r in v)}
    for key, members in cells.items():
        ok = [r for r in members if r.status == "ok"]
        if not ok:
            continue
        row = got[key]
        other = [r.total_s - r.prefill_s - r.draft_s - r.verify_s - r.commit_s for r in ok]
        measured = [r for r in ok if r.energy_j is not None]
        peaks = [r.peak_mem_bytes for r in ok if r.peak_mem_bytes is not None]
        assert row["total_s_mean"] == pytest.approx(sum(r.total_s for r in ok) / len(ok))
        assert row["other_s_mean"] == pytest.approx(sum(other) / len(ok))
        latencies = [r.total_s for r in ok]
        assert p99[key] == pytest.approx(_quantile(latencies, 0.99))
        assert row["energy_rows"] == len(measured)
        if measured:
            per_token = sum(r.energy_j for r in measured) / sum(r.new_tokens for r in measured)
            assert row["energy_per_token_j"] == pytest.approx(per_token)
        else:
            assert row["energy_per_token_j"] is None
        assert row["peak_mem_bytes"] == (max(peaks) if peaks else None)
        curve = details.latency.filter(*[pl.col(k) == v for k, v in zip(CELL_KEYS, key)]).sort(
            "quantile"
        )
        assert curve["quantile"].to_list() == list(CDF_QUANTILES)
        for q in (0.0, 0.5, 0.9, 1.0):
            at = curve.filter(pl.col("quantile") == q)["latency_s"].item()
            assert at == pytest.approx(_quantile(latencies, q))
    errors = Counter(
        (r.model, r.method, r.batch_size, r.temperature, r.error) for r in rows if r.status != "ok"
    )
    assert {
        (*[e[k] for k in CELL_KEYS], e["error"]): e["rows"]
        for e in details.errors.iter_rows(named=True)
    } == dict(errors)
    assert details.rows == len(rows)


def test_html_is_self_contained_and_leads_with_the_verdict(failing_run: Path) -> None:
    md_path = write_report(failing_run)
    page = failing_run / "report.html"
    text = page.read_text()
    md = md_path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("<!-- Lossless: FAILED") and "Error rows: 2." in first
    assert md.splitlines()[0].startswith("**Lossless: FAILED**")
    # the banner is the first thing in <body>
    body = text.split("<body>", 1)[1].lstrip()
    assert body.startswith('<header class="verdict fail"')
    # nothing to fetch: no scripts, style sheets, images or links leaving the page
    assert not re.search(r"<(script|link|img|iframe|object)\b", text)
    assert not re.search(r"\b(src|href)\s*=\s*\"(?!#)", text)
    assert "url(" not in text and "@import" not in text
    assert text.count('<svg class="plot"') == expected_plots(md)
    # energy where measured (batch size 1), "not measured" where not, in both renderings
    assert "not measured" in text and "not measured" in md
    assert " mJ" in md or " J" in md
    for label in ("Latency CDF", "Latency breakdown", "Speedup vs batch size", "Errors"):
        assert label in text


def test_report_renders_in_chromium(browser: str, failing_run: Path, tmp_path: Path) -> None:
    md = write_report(failing_run).read_text()
    page = failing_run / "report.html"
    summary = render_summary(browser, page, tmp_path)
    check_rendered(summary, md)
    assert summary["first_line"].startswith("Lossless: FAILED"), summary["first_line"]

    image = screenshot(browser, page, tmp_path)
    assert image.size[0] >= 1000
    # not blank: many colours, and the top banner is the failure red (#b3261e)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 200
    r, g, b = image.getpixel((5, 5))
    assert r > 150 and g < 80 and b < 80, (r, g, b)


@pytest.mark.slow
def test_small_real_run_renders_in_chromium(browser: str, tmp_path: Path) -> None:
    """Tiny Qwen2.5-VL on MMSpec testmini, run in-process as the workers do, then rendered."""
    from mmspec.orchestrator.grid import expand, make_shards, parse_grid
    from mmspec.orchestrator.manifest import build_manifest
    from mmspec.orchestrator.runner import ShardRunner
    from mmspec.orchestrator.store import write_manifest, write_shard
    from mmspec.orchestrator.workload_config import load_samples
    from mmspec.results.schema import rows_to_table

    grid = parse_grid(
        {
            "name": "report-html",
            "workloads": [{"path": str(mmspec_split("testmini")), "limit": 6}],
            "models": [{"id": "tiny-qwen2.5-vl"}],
            "methods": ["ar", "pld"],
            "batch_sizes": [1, 2],
            "max_new_tokens": 24,
            "shard_size": 4,
        }
    )
    samples = {w.name: load_samples(w) for w in grid.workloads}
    run = tmp_path / "report-html-run"
    run.mkdir()
    write_manifest(run, build_manifest(run.name, grid, samples))
    runners: dict[str, ShardRunner] = {}
    for shard in make_shards(expand(grid), samples, run.name, grid.shard_size):
        cell = shard.cell
        if cell.method not in runners:
            runners[cell.method] = ShardRunner(cell.model, cell.method, cell.method_args, threads=1)
        write_shard(run, shard, rows_to_table(runners[cell.method].run(shard)))

    md = write_report(run).read_text()
    assert md.splitlines()[0].startswith("**Lossless: all 2 checks passed.**"), md[:300]
    summary = render_summary(browser, run / "report.html", tmp_path)
    check_rendered(summary, md)
    assert summary["first_line"].startswith("Lossless: all 2 checks passed")
    image = screenshot(browser, run / "report.html", tmp_path)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 200


def rendered_plot_titles(run: Path, tmp: Path) -> list[str]:
    """Write `run`'s report, render its page in Chromium (skip without one), check every
    table and chart drew, and return the charts' titles."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found: apt-get install chromium chromium-driver")
    md = write_report(run).read_text()
    summary = render_summary(browser, run / "report.html", tmp)
    check_rendered(summary, md)
    return [p["title"] for p in summary["plots"]]
