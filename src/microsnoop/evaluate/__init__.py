"""Benchmarks: score embeddings on labelled sets (kNN and MLP cross-validation) and report them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .benchmark import BenchmarkRun, load_set, run_benchmark
from .protocols import knn_predict, run_knn, run_mlp_cv, run_protocol


def benchmark_and_report(dataset_dirs: Sequence[str | Path], models: Sequence[str], report_dir: str | Path, *,
              plot: str = "umap", **kwargs: Any) -> tuple[BenchmarkRun, dict[str, Path]]:
    """Run every protocol of every set for every model and write report.json / report.md / figures."""
    from .report import write_report

    run = run_benchmark(dataset_dirs, models, report_dir, **kwargs)
    return run, write_report(run, report_dir, plot=plot)


__all__ = ["BenchmarkRun", "benchmark_and_report", "knn_predict", "load_set", "run_benchmark", "run_knn", "run_mlp_cv",
           "run_protocol"]
