"""report.html of a real BBBC013 plate run and of a benchmark run, opened in headless Chromium.

Chromium (Debian's ``chromium``) is installed with apt-get when missing and the test runs as root;
otherwise the browser checks skip with the reason. Screenshots are kept under pytest's tmp dir (the
path is printed) and copied to ``$MICROSNOOP_ARTEFACTS`` when that is set.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly", reason="report.html needs plotly (pip install 'microsnoop[plates]')")

# rows A, B (first inhibitor's series) and E, F (second's): 48 wells, each dose twice per block,
# 8 negative and 4 positive control wells
ROWS = ("A", "B", "E", "F")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]

# injected into a copy of the page: records errors, then (after Plotly drew) hovers a well and writes
# what the test checks into <pre id="probe"> for --dump-dom
PROBE = """<script>
window.__errs = [];
window.addEventListener('error', function (e) { window.__errs.push('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) { window.__errs.push('rejection: ' + e.reason); });
(function () { var ce = console.error; console.error = function () {
  window.__errs.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); }; })();
window.addEventListener('load', function () { setTimeout(function () {
  var out = {errors: window.__errs, plots: {}, tables: {}, hover: {}};
  document.querySelectorAll('.plotly-graph-div').forEach(function (gd) {
    out.plots[gd.id] = {drawn: gd.classList.contains('js-plotly-plot') && !!gd.querySelector('.main-svg'),
                        traces: (gd.data || []).length}; });
  document.querySelectorAll('table').forEach(function (t) { out.tables[t.id] = t.querySelectorAll('tbody tr').length; });
  var pm = document.getElementById('plate-map'), box = document.getElementById('montage');
  function seen() { return [box.querySelector('.well').textContent, (box.querySelector('img').src || '').slice(0, 22)]; }
  function move(gd, sub, fx, fy) {  // a real mouse move over a subplot, as a user's pointer would do
    var d = gd.querySelector('.draglayer .' + sub + ' .nsewdrag'), r = d.getBoundingClientRect();
    d.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + fx(r), clientY: r.top + fy(r), bubbles: true}));
  }
  function done() { var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
                    document.body.appendChild(pre); }
  if (!pm) return done();
  var z = pm.data[0].z, n = 0; z.forEach(function (r) { r.forEach(function (v) { if (v !== null) n++; }); });
  out.plateCells = n;
  move(pm, 'xy', function (r) { return r.width / 24; }, function (r) { return r.height / 16; });  // well A01
  setTimeout(function () {
    out.hover.heatmap = seen();
    var mp = document.getElementById('maps'), last = mp.data.length - 1, t = mp._fullData[last];
    var xa = mp._fullLayout[t.xaxis.replace('x', 'xaxis')], ya = mp._fullLayout[t.yaxis.replace('y', 'yaxis')];
    var x0 = Array.from(t.x)[0], y0 = Array.from(t.y)[0];
    move(mp, t.xaxis + t.yaxis, function () { return xa.d2p(x0); }, function () { return ya.d2p(y0); });
    setTimeout(function () { out.hover.cells = seen().concat([t.customdata[0]]); done(); }, 400);
  }, 400);
}, 1500); });
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = find_chromium()
    if exe is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        try:  # Debian's package; no download happens when the browser runs
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300, check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600,
                           check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except (OSError, subprocess.TimeoutExpired):
            pass
        exe = find_chromium()
    if exe is None:
        pytest.skip("headless Chromium not available (apt-get install chromium failed or not root)")
    return exe


def run_chromium(exe: str, page: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile each time
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                               "--v=0", "--virtual-time-budget=30000", *args, page.as_uri()],
                              capture_output=True, text=True, timeout=timeout)


def open_in_browser(exe: str, html_path: Path, shot: Path, size: str) -> dict:
    """Probe the page (DOM dump) and screenshot it; returns the probe's findings."""
    probed = html_path.with_name("probe_" + html_path.name)
    probed.write_text(html_path.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    res = run_chromium(exe, probed, "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert found, f"page did not finish loading in Chromium: {res.stderr[-2000:]}"
    import html as htmlmod

    probe = json.loads(htmlmod.unescape(found.group(1)))
    probe["console"] = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln and "Uncaught" in ln]
    # the screenshot shows the page after the probe hovered a cell: the crop box is filled
    res = run_chromium(exe, probed, f"--window-size={size}", f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 20_000, res.stderr[-2000:]
    print(f"screenshot: {shot}")
    if os.environ.get("MICROSNOOP_ARTEFACTS"):
        dest = Path(os.environ["MICROSNOOP_ARTEFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)
    return probe


def assert_self_contained(html_path: Path) -> str:
    text = html_path.read_text(encoding="utf-8")
    assert not re.search(r"""<(script|img|link|iframe)[^>]+(src|href)=["']?(https?:)?//""", text), "page loads a URL"
    assert "Plotly" in text and text.count("<script type='text/javascript'>") == 2  # plotly.js inlined once
    return text


# ---------------------------------------------------------------------------------- plate


@pytest.fixture(scope="module")
def plate_run(shared_data, tmp_path_factory) -> Path:
    """A real BBBC013 plate run on 48 wells (classical segmentation, 8 cells per field)."""
    from microsnoop.workflows.plate import PlateSettings, run_plate

    folder = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(folder / "manifest.csv")
    df = df[df["Metadata_Well"].str[0].isin(ROWS)].copy()
    for ch in ("GFP", "DNA"):
        df[f"FileName_{ch}"] = [str(folder / f) for f in df[f"FileName_{ch}"]]
    d = tmp_path_factory.mktemp("plate48")
    df.to_csv(d / "manifest.csv", index=False)
    s = PlateSettings(channels=["GFP", "DNA"], segmenter="classical", max_cells=8, crop_size=64, precision="bf16",
                      device="cpu")
    res = run_plate(d / "manifest.csv", d / "run", s)
    assert res.files["report_html"] == d / "run" / "report.html"
    return d / "run"


def test_plate_run_writes_a_self_contained_report(plate_run):
    page = plate_run / "report.html"
    text = assert_self_contained(page)
    assert page.stat().st_size < 20e6
    assert (plate_run / "cells_sample.parquet").exists() and len(list((plate_run / "previews").glob("*.png"))) == 48
    # every well's crop montage is inlined for the hover box
    montages = json.loads(re.search(r"id='montage-data'>(.*?)</script>", text, re.S).group(1).replace("<\\/", "</"))
    assert len(montages) == 48 and all(v.startswith("data:image/png;base64,") for v in montages.values())
    assert {"A01", "F12"} <= set(montages)


def test_plate_report_opens_in_chromium(plate_run, chromium, tmp_path):
    probe = open_in_browser(chromium, plate_run / "report.html", tmp_path / "plate_report.png", "1500,3200")
    assert probe["errors"] == [] and probe["console"] == []
    assert {"plate-map", "dose-response", "maps"} <= set(probe["plots"])
    assert all(p["drawn"] for p in probe["plots"].values()), probe["plots"]
    assert probe["plateCells"] == 48                      # 4 rows x 12 columns of the 8 x 12 layout filled
    assert probe["tables"]["map-table"] == 20             # 10 doses x 2 blocks
    assert probe["tables"]["dose-table"] == 2 and probe["tables"]["zprime-table"] >= 8
    assert probe["hover"]["heatmap"] == ["A01", "data:image/png;base64,"]   # hovering A01 shows its crops
    well, img, _ = probe["hover"]["cells"]      # a cell of the cell map (or its nearest neighbour): its well's crops
    assert re.fullmatch(r"[A-F]\d\d", well) and img == "data:image/png;base64,"


def test_report_command_rerenders_and_rejects_other_folders(plate_run, tmp_path, cli):
    out = tmp_path / "again.html"
    code, _, err = cli("report", plate_run, "-o", out, "--score", "cells")
    assert code == 0, err
    text = out.read_text(encoding="utf-8")
    assert "cells embedded: %{z:.3f}" in text         # the plate map opens on the score asked for
    code, _, err = cli("report", tmp_path)
    assert code == 2 and "no report.json" in err
    code, _, err = cli("report", plate_run, "--score", "nope")
    assert code == 2 and "--score" in err


def test_a_failing_report_warns_and_never_fails_the_run(plate_run, monkeypatch):
    from microsnoop.evaluate import html_plate, html_report

    monkeypatch.setattr(html_plate, "plate_page", lambda *a, **k: 1 / 0)
    with pytest.warns(UserWarning, match="report.html not written .*ZeroDivisionError"):
        assert html_report.write_html_report_safely(plate_run, output=plate_run / "x.html") is None
    assert not (plate_run / "x.html").exists()


def test_well_positions_from_names_and_rows():
    from microsnoop.evaluate.html_plate import row_name, well_positions

    r, c = well_positions(pd.DataFrame({"Metadata_Well": ["A01", "h12", "P24", "AA3"]}))
    assert r.tolist() == [0, 7, 15, 26] and c.tolist() == [0, 11, 23, 2]
    r, c = well_positions(pd.DataFrame({"Metadata_Row": [2, "C"], "Metadata_Column": [5, 1]}))
    assert r.tolist() == [1, 2] and c.tolist() == [4, 0]
    assert well_positions(pd.DataFrame({"Metadata_Well": ["x"]})) is None
    assert [row_name(i) for i in (0, 25, 26)] == ["A", "Z", "AA"]


# ------------------------------------------------------------------------------ benchmark


@pytest.fixture(scope="module")
def bench_run(shared_data, tmp_path_factory) -> Path:
    """A benchmark run of 70 real MCF-7 cells (5 per well of bbbc021_dmso_vs_cycloheximide)."""
    from microsnoop.evaluate import benchmark_and_report

    src = shared_data / "benchmarks" / "bbbc021_dmso_vs_cycloheximide"
    meta = pd.read_csv(src / "metadata.csv")
    rows = meta.groupby("Metadata_Well", sort=True).head(5).index.to_numpy()
    d = tmp_path_factory.mktemp("bench")
    np.save(d / "images.npy", np.load(src / "images.npy", mmap_mode="r")[rows])
    meta.iloc[rows].to_csv(d / "metadata.csv", index=False)
    info = json.loads((src / "dataset.json").read_text())
    info.update(name="bbbc021_small", n_images=len(rows))
    (d / "dataset.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="untrained"):
        _, paths = benchmark_and_report([d], ["random-init"], d / "rep", device="cpu", plot="pca")
    assert paths["html"] == d / "rep" / "report.html"
    return d / "rep"


def test_benchmark_report_opens_in_chromium(bench_run, chromium, tmp_path):
    assert_self_contained(bench_run / "report.html")
    assert (bench_run / "figures" / "bbbc021_small__random-init_pca.png").exists()   # PNGs kept for papers
    probe = open_in_browser(chromium, bench_run / "report.html", tmp_path / "benchmark_report.png", "1400,2400")
    assert probe["errors"] == [] and probe["console"] == []
    assert {"chart-0", "map-0-0", "confusion-0-0"} <= set(probe["plots"])
    assert all(p["drawn"] for p in probe["plots"].values()), probe["plots"]
    assert probe["plots"]["confusion-0-0"]["traces"] == 4   # one matrix per protocol of the set
    assert probe["tables"]["scores-0"] == 1 and probe["tables"]["models-table"] == 1
