"""The command line as a whole: help on every option, one name per setting, renamed options, -v/-q,
the compare/attribution subcommands, install hints naming the extra, and docs that only show real options."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# one setting, one visible name: the dest (Python parameter) and its option names in every command that has it
CANONICAL = {
    "segment_channel": ["--segment-channel"], "segmenter": ["--segmenter"], "mode": ["--mode"],
    "crop_size": ["--crop-size"], "max_cells": ["--max-cells"], "diameter": ["--diameter"],
    "device": ["--device"], "precision": ["--precision"], "segment_precision": ["--segment-precision"],
    "threads": ["--threads"], "engine": ["--engine"], "batch_size": ["--batch-size"], "channels": ["--channels"],
    "channel_index": ["--channel-index"], "path_columns": ["--path-columns"], "controls": ["--controls"],
    "treatment": ["--treatment"], "normalize": ["--normalize"], "fmt": ["--format"], "model": ["--model", "-m"],
    "output": ["--output", "-o"], "overwrite": ["--overwrite"], "resume": ["--resume"], "shard": ["--shard"],
    "merge": ["--merge"], "aggregate_method": ["--aggregate-method"], "method": ["--method"], "seed": ["--seed"],
    "label": ["--label"], "metadata": ["--metadata"],
}


def commands() -> dict:
    from microsnoop.cli import app

    return typer.main.get_command(app).commands


def visible_options(cmd) -> dict[str, list[str]]:
    """dest -> option names shown in --help (the on-switch names; --no-x is a flag's other half)."""
    return {p.name: sorted(p.opts) for p in cmd.params if not p.hidden and p.param_type_name == "option"}


def test_every_visible_option_and_argument_has_help():
    from microsnoop.cli import app

    root = typer.main.get_command(app)
    missing = [f"microsnoop {p.name}" for p in root.params if not (getattr(p, "help", "") or "").strip()]
    for name, cmd in commands().items():
        assert (cmd.help or "").strip(), f"command {name} has no help"
        missing += [f"{name} {p.opts[0] if p.opts else p.name}" for p in cmd.params
                    if not p.hidden and not (getattr(p, "help", "") or "").strip()]
    assert missing == []


def test_one_name_per_setting_across_commands():
    names_of: dict[str, set] = {}
    dest_of: dict[str, set] = {}
    for name, cmd in commands().items():
        for dest, opts in visible_options(cmd).items():
            if dest in CANONICAL:
                assert opts == sorted(CANONICAL[dest]), f"{name}: {dest} is {opts}, not {CANONICAL[dest]}"
            names_of.setdefault(dest, set()).add(tuple(opts))
            for o in opts:
                dest_of.setdefault(o, set()).add(dest)
    assert {d: n for d, n in names_of.items() if len(n) > 1} == {}  # a setting with two names
    assert {o: d for o, d in dest_of.items() if len(d) > 1} == {}  # a name meaning two settings
    # --method is train's training method only (profile's aggregation method is --aggregate-method)
    assert [c for c, cmd in commands().items() if "--method" in sum(visible_options(cmd).values(), [])] == ["train"]


def test_renamed_options_are_hidden_aliases_that_warn(capsys):
    from microsnoop.cli import RENAMED, renamed_args

    cases = [("segment", "--channel", ["in.npy", "-o", "out", "--channel", "DNA"], "segment_channel", "DNA"),
             ("profile", "--method", ["in.parquet", "-o", "w.parquet", "--method=median"], "aggregate_method", "median"),
             ("benchmark", "--fields-mode", ["set", "-m", "x", "-o", "r", "--fields-mode", "tile"], "mode", "tile"),
             ("benchmark", "--fields-segmenter", ["set", "-m", "x", "-o", "r", "--fields-segmenter", "classical"],
              "segmenter", "classical")]
    assert {(c, old) for c, old, *_ in cases} == {(c, old) for c, table in RENAMED.items() for old in table}
    cmds = commands()
    for name, old, args, dest, value in cases:
        cmd = cmds[name]
        assert RENAMED[name][old] in visible_options(cmd)[dest]  # the new name is the visible one
        assert all(old not in opts for opts in visible_options(cmd).values())  # the old one is not shown
        ctx = cmd.make_context(name, list(args))
        assert ctx.params[dest] == value
        err = capsys.readouterr().err
        assert err == f"warning: {name} {old} is deprecated; use {RENAMED[name][old]}\n"
    # '--' ends the options: a file called --channel stays a file
    assert renamed_args("segment", ["--channel=DNA", "--", "--channel"]) == ["--segment-channel=DNA", "--", "--channel"]


def test_renamed_option_works_end_to_end(cli, yeast_subset, tmp_path):
    code, _, err = cli("segment", yeast_subset, "-o", tmp_path / "seg", "--segmenter", "classical", "--channel", "RFP_cytosol")
    assert code == 0, err
    assert err.splitlines()[0] == "warning: segment --channel is deprecated; use --segment-channel"
    assert json.loads((tmp_path / "seg" / "segmentation.json").read_text())["channel"] == "RFP_cytosol"
    assert np.load(tmp_path / "seg" / "masks.npy").shape == (96, 64, 64)


def test_segment_has_device_with_embeds_default(cli, yeast_subset, tmp_path):
    device = {n: {p.name: p for p in c.params}["device"].default for n, c in commands().items() if n in ("embed", "segment")}
    assert device == {"embed": "auto", "segment": "auto"}
    code, _, err = cli("segment", yeast_subset, "-o", tmp_path / "seg", "--device", "tpu")
    assert code == 2 and err.strip() == "error: unknown device 'tpu' (use auto, cpu, cuda, cuda:N or mps)"


def test_train_help_lists_the_registered_methods(cli, monkeypatch):
    from microsnoop.train.base import list_methods

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps help to the terminal width
    code, out, _ = cli("train", "--help")
    assert code == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    names = [m.name for m in list_methods()]
    assert len(names) >= 5 and "Registered: " + ", ".join(names) in text


@pytest.fixture(scope="module")
def yeast_two_proteins(yeast, tmp_path_factory) -> Path:
    """20 real yeast cells of each of two proteins (AAC1: mitochondrial, AAP1: another localisation)."""
    import pandas as pd

    meta = pd.read_csv(yeast / "metadata.csv")
    rows = np.concatenate([np.flatnonzero(meta["Metadata_Protein"] == p)[:20] for p in ("AAC1", "AAP1")])
    d = tmp_path_factory.mktemp("yeast40")
    np.save(d / "images.npy", np.load(yeast / "images.npy", mmap_mode="r")[rows])
    meta.iloc[rows].to_csv(d / "metadata.csv", index=False)
    (d / "dataset.json").write_text((yeast / "dataset.json").read_text())
    return d / "images.npy"


def run_microsnoop(*args) -> tuple[int, str, str]:
    """The CLI in a fresh process, as a user runs it (warnings and logging not captured by pytest)."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-m", "microsnoop.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=600)
    return res.returncode, res.stdout, res.stderr


def test_verbosity_default_v_and_q(yeast_two_proteins, tmp_path):
    args = ["embed", yeast_two_proteins, "--device", "cpu", "-m", "random-init"]
    code, out, err = run_microsnoop(*args, "-o", tmp_path / "a.parquet")
    assert code == 0, err
    assert "wrote 40 images" in err and "warning: model 'random-init' is untrained" in err
    assert "model random-init (sha256" not in err  # INFO lines only with -v
    code, out, err = run_microsnoop("-v", *args, "-o", tmp_path / "b.parquet")
    assert code == 0 and "model random-init (sha256" in err and "device cpu" in err and "wrote 40 images" in err
    code, out, err = run_microsnoop("-q", *args, "-o", tmp_path / "c.parquet")
    assert code == 0 and (out, err) == ("", "") and (tmp_path / "c.parquet").exists()
    code, out, err = run_microsnoop("-q", *args, "-o", tmp_path / "c.parquet")  # errors still print under -q
    assert code == 2 and err.startswith("error: ") and "c.parquet" in err and len(err.splitlines()) == 1


def test_quiet_scopes_its_warning_filter_to_the_command(cli, tmp_path):
    filters = list(warnings.filters)
    code, out, err = cli("-q", "compare", tmp_path / "missing.json", "-m", "x")
    assert code == 2 and err.startswith("error: ") and "missing.json" in err
    assert warnings.filters == filters  # tests (and other callers of main()) keep their filters
    code, _, err = cli("-q", "segment", tmp_path / "in.npy", "-o", tmp_path / "seg", "--channel", "DNA")
    assert code == 2 and err.startswith("error: ") and "deprecated" not in err  # -q hides the alias warning too
    code, _, err = cli("-q", "-v", "models")
    assert code == 2 and "contradict" in err


def test_attribution_subcommand_on_real_embeddings(cli, yeast_two_proteins, tmp_path):
    from microsnoop.evaluate.attribution import attribution_from_file, render_attribution

    emb = tmp_path / "yeast.parquet"
    code, _, err = cli("-q", "embed", yeast_two_proteins, "-o", emb, "--device", "cpu")
    assert code == 0, err
    code, out, err = cli("attribution", emb, "--label", "Metadata_Protein", "--k", "5", "--repeats", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("# channel attribution (knn, label Metadata_Protein")
    assert [ln.split()[0] for ln in lines[2:]] == ["GFP_protein", "RFP_cytosol"]
    df = attribution_from_file(str(emb), "Metadata_Protein", "knn", {"k": 5}, repeats=2)
    assert out.strip() == render_attribution(df).strip()
    assert df["baseline"].iloc[0] > 0.75  # two proteins, 20 cells each: far above chance (0.5)
    code, _, err = cli("attribution", emb, "--label", "Metadata_Nope")
    assert code == 2 and "Metadata_Nope" in err and "yeast.parquet" in err and len(err.splitlines()) == 1


def test_compare_subcommand(cli, tmp_path):
    recs = [{"model": m, "dataset": d, "accuracy": a} for m, d, a in [
        ("new", "A", 0.80), ("new", "A", 0.60), ("new", "B", 0.50), ("new", "C", 0.90),
        ("base", "A", 0.70), ("base", "A", 0.71), ("base", "B", 0.504), ("base", "C", 0.95)]]
    (tmp_path / "report.json").write_text(json.dumps({"records": recs}))
    code, out, err = cli("compare", tmp_path / "report.json", "-m", "new", "--baseline", "base")
    assert code == 0, err
    assert out.splitlines()[-1] == "| base | -0.005 | -0.004 | -0.050 | 2 / 3 |"
    code, _, err = cli("compare", tmp_path / "report.json", "-m", "new", "--tol", "0.001")
    assert code == 0 and "| base | -0.005 | -0.004 | -0.050 | 0 / 3 |" in _
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = cli("compare", tmp_path / "bad.json", "-m", "new")
    assert code == 2 and err.startswith("error: ") and "bad.json" in err and len(err.splitlines()) == 1


def test_install_hints_name_the_extra_from_pyproject():
    import tomllib

    from microsnoop.core.extras import EXTRAS, extra_for, install_hint

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, reqs in extras.items():
        if extra == "test":
            continue
        dists = [re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in reqs]
        assert sorted(EXTRAS[extra]) == sorted(dists), extra
        assert all(extra_for(d) == extra for d in dists)
    assert set(EXTRAS) == set(extras) - {"test"}
    assert install_hint("umap") == "pip install 'microsnoop[plates]'"  # import name -> umap-learn
    assert install_hint("zarr") == "pip install 'microsnoop[plates]'"
    assert install_hint("copairs.map") == "pip install 'microsnoop[plates]'"
    assert install_hint("efficientnet_lite_pytorch") == "pip install 'microsnoop[baselines]'"
    assert install_hint("onnxruntime") == "pip install 'microsnoop[fast]'"
    assert install_hint("scellseg") == "pip install scellseg"  # not in an extra


def test_missing_optional_package_error_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    code, _, err = cli("report", tmp_path)
    assert code == 2 and err.strip() == "error: report.html needs plotly: pip install 'microsnoop[report]'"

    import microsnoop.evaluate.compare as comp

    def missing(paths):
        raise ModuleNotFoundError("No module named 'umap'", name="umap")

    monkeypatch.setattr(comp, "read_records", missing)  # any command: an escaped ImportError of an extra's package
    code, _, err = cli("compare", tmp_path / "r.json", "-m", "x")
    assert code == 2 and err.strip() == "error: this command needs umap: pip install 'microsnoop[plates]'"


def test_dev_tools_are_outside_the_package():
    import importlib.util

    assert importlib.util.find_spec("microsnoop.evaluate.refresh") is None
    src = ROOT / "src" / "microsnoop"
    assert [p.name for p in src.rglob("*.py") if "argparse" in p.read_text()] == []  # one CLI: typer
    env = {"PYTHONPATH": str(src.parent), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "refresh.py"), "--help"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python benchmarks/refresh.py")


# ----------------------------------------------------------------- docs show only real options

COMMAND_RE = re.compile(r"(?:^|[\s`(])(?:microsnoop|-m microsnoop)((?:\s+-\S+)*)\s+([a-z][a-z-]*)")
# options of other tools that the docs show (torchrun, Slurm, pip, dev scripts under benchmarks/)
OTHER_TOOLS = {"--test", "--standalone", "--nproc_per_node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint",
               "--rdzv-id", "--node-rank", "--master-addr", "--master-port", "--job-name", "--nodes",
               "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--requeue", "--no-deps",
               "--report-dir", "--models", "--quick", "--skip-rss", "--fields-max-cells", "--fields-crop-size",
               "--peers-only", "--peer-run", "--data", "--docs", "--plot", "--max-pixels",
               "--fields", "--repeats", "--engines", "--sizes"}  # benchmarks/*.py scripts


def _command_segments(text: str):
    """(command, text of its options) for every `microsnoop CMD ...` in the docs, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        for m in COMMAND_RE.finditer(line):
            rest = line[m.end():]
            rest = re.split(r"`|\s#\s|\s#$|&&|;|\|", rest)[0]  # end of the code span / comment / next command
            yield m.group(2), m.group(1) + " " + rest


def test_docs_show_only_existing_options():
    from microsnoop.cli import RENAMED, app

    root = typer.main.get_command(app)
    global_opts = {o for p in root.params for o in p.opts + p.secondary_opts} | {"--help"}
    cmds = root.commands
    shown = {n: {o for p in c.params if not p.hidden for o in p.opts + p.secondary_opts} for n, c in cmds.items()}
    every = set().union(*shown.values()) | global_opts
    bad, checked = [], 0
    for f in DOC_FILES:
        text = f.read_text()
        for name, opts in _command_segments(text):
            if name not in cmds:
                continue
            for tok in re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", opts):
                checked += 1
                if tok not in shown[name] | global_opts:
                    bad.append(f"{f.name}: microsnoop {name} {tok}")
        for tok in set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text)):  # prose: an option of some command
            old = {o for t in RENAMED.values() for o in t}
            if tok not in every | OTHER_TOOLS and not (f.name == "cli.md" and tok in old):
                bad.append(f"{f.name}: {tok}")
    assert checked > 100 and bad == []
