from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the suite checks torch's numerics unless a test asks for an engine (tests/test_engines.py covers
# engine=auto and the optional engines); exports would otherwise be compiled for every new shape
os.environ.setdefault("MICROSNOOP_ENGINE", "torch")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared data not found at {SHARED} (it sits beside the repo on dev machines and in CI)")
    return SHARED


@pytest.fixture(scope="session")
def yeast(shared_data) -> Path:
    return shared_data / "benchmarks" / "yeast_pci"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process like the console script does; returns (exit code, stdout, stderr)."""
    from microsnoop.cli import main

    old = sys.argv
    sys.argv = ["microsnoop", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def refresh_module():
    """benchmarks/refresh.py (a developer tool outside the installed package), imported from its file."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "refresh.py"
    spec = importlib.util.spec_from_file_location("microsnoop_benchmarks_refresh", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli(list(args), capsys)


@pytest.fixture(scope="session")
def yeast_subset(yeast, tmp_path_factory) -> Path:
    """First 96 yeast cells (real images) as a small array input, with their metadata rows and dataset.json."""
    import shutil

    import pandas as pd

    d = tmp_path_factory.mktemp("yeast96")
    np.save(d / "images.npy", np.load(yeast / "images.npy", mmap_mode="r")[:96])
    pd.read_csv(yeast / "metadata.csv").iloc[:96].to_csv(d / "metadata.csv", index=False)
    shutil.copy(yeast / "dataset.json", d / "dataset.json")
    return d / "images.npy"


@pytest.fixture(scope="session")
def tiny_pool(shared_data, tmp_path_factory) -> Path:
    """8 real pretraining images (2 per modality), centre-cropped to 96 px, with a manifest."""
    import pandas as pd
    import tifffile

    from microsnoop.io.images import read_image

    src = shared_data / "pretrain"
    man = pd.read_csv(src / "manifest.csv")
    d = tmp_path_factory.mktemp("pool8")
    rows = []
    for modality, grp in man.groupby("modality"):
        for rel in grp["path"].iloc[:2]:
            img = read_image(src / rel)[0]
            y0, x0 = (img.shape[0] - 96) // 2, (img.shape[1] - 96) // 2
            tifffile.imwrite(d / Path(rel).name, img[y0:y0 + 96, x0:x0 + 96])
            rows.append({"path": Path(rel).name, "modality": modality})
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    return d


def embedding_parts(path) -> tuple:
    """(metadata frame, (N, D) float32 features, provenance) of an output, via the one public reader."""
    from microsnoop import feature_columns, read_embeddings

    df = read_embeddings(path)
    names = feature_columns(df)
    return df.drop(columns=names), df[names].to_numpy(dtype=np.float32), df.attrs["microsnoop"]


def profile_parts(path) -> tuple:
    """(whole frame, feature names, provenance) of a profiles file, via the one public reader."""
    from microsnoop import feature_columns, read_embeddings

    df = read_embeddings(path)
    return df, feature_columns(df), df.attrs["microsnoop"]
