"""Command-line interface: parses options and calls the same functions as the Python API.

Errors about the user's input are printed as one line (``error: FILE: problem``) with exit code 2.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MicrosnoopError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Embed microscopy images (Microsnoop): single cells, whole fields and plates.")
console = Console(stderr=True)
log = logging.getLogger("microsnoop")


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def command_line() -> str:
    return "microsnoop " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def progress_bar(total: int, label: str):
    """A rich progress bar with images/s and ETA; returns (context manager, advance callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:7.1f} img/s" if task.speed else "    - img/s")

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Speed(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    task = prog.add_task(label, total=total)
    return prog, lambda n: prog.advance(task, n)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details (device choice, timings).")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    # our own warnings (e.g. "model is untrained") as one plain line, not a source listing
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


@app.command()
def embed(
    input: Path = typer.Argument(..., help=".npy/.npz (N,C,H,W), a folder of TIFF/PNG images, a CSV manifest, or one image."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file: .parquet, .h5 or .h5ad."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model name (see `microsnoop models`) or a checkpoint path. Default: the shipped default model."),
    fmt: Optional[str] = typer.Option(None, "--format", help="parquet | h5 | h5ad (default: from the output suffix)."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Folder input: channel tokens in file names, e.g. 'w1,w2,w3'. Manifest: channel names of FileName_<name> columns to use, in order."),
    channel_names: Optional[str] = typer.Option(None, "--channel-names", help="Names for the channels, in order, e.g. DNA,Tubulin,Actin (default: dataset.json, tokens, or ch0,ch1...)."),
    channel_index: Optional[str] = typer.Option(None, "--channel-index", help="Keep these planes of multi-channel files, e.g. 0,1 (drops an empty blue plane of RGB PNGs)."),
    path_columns: Optional[str] = typer.Option(None, "--path-columns", help="Manifest: path columns, one per channel (default: all FileName_* columns)."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="Array input: metadata CSV (default: metadata.csv beside it)."),
    chunk_size: int = typer.Option(1024, "--chunk-size", help="Images read and kept in memory at a time."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="One-channel planes per forward pass (default: auto, ~1M pixels: 256 planes of 64x64, 20 of 224x224)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps."),
    precision: str = typer.Option("auto", "--precision", help="auto (default: bf16 on CPUs with native bf16 and on CUDA, for models validated in bf16 - cosine >= 0.999 to fp32; else fp32) | fp32 | bf16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per process (default: the CPUs available, divided among torchrun's local ranks)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its finished chunks."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Embed images: every channel separately, vectors concatenated in channel order (256 per channel)."""
    from .embed import Embedder, embed_source
    from .io import open_source

    src = open_source(input, channels=_split(channels), channel_names=_split(channel_names),
                      path_columns=_split(path_columns), channel_index=[int(i) for i in _split(channel_index) or []],
                      metadata=metadata)
    emb = Embedder(model, device=device, precision=precision, batch_size=batch_size, threads=threads)
    log.info("model %s (sha256 %s), device %s, precision %s", emb.encoder.name, emb.encoder.sha256[:12], emb.device, emb.precision)
    prog, advance = progress_bar(len(src), "embedding")
    with prog:
        out = embed_source(src, output, fmt=fmt, chunk_size=chunk_size, resume=resume, overwrite=overwrite,
                           command=command_line(), progress=advance, embedder=emb)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 merged and reports
        return
    console.print(f"wrote {len(src)} images x {len(src.channel_names) * emb.dim} features "
                  f"({', '.join(src.channel_names)}) to {out}")


@app.command()
def models() -> None:
    """List registered models: licence, training data, input size, sha256."""
    from .models import default_model_name, list_models

    table = Table(title="microsnoop models")
    for col in ("name", "trained on", "input size", "licence", "sha256"):
        table.add_column(col, overflow="fold")
    default = default_model_name()
    for spec in list_models():
        name = spec.name + (" (default)" if spec.name == default else "") + ("" if spec.trained else " [untrained]")
        table.add_row(name, spec.training_data, spec.input_size, spec.license, (spec.sha256 or "-")[:16])
    Console().print(table)


@app.command()
def inspect(
    input: Path = typer.Argument(..., help="Input to check before a long run (same forms as `embed`)."),
    channels: Optional[str] = typer.Option(None, "--channels"),
    path_columns: Optional[str] = typer.Option(None, "--path-columns"),
    channel_index: Optional[str] = typer.Option(None, "--channel-index"),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Metadata columns to count images by (default: Plate/Well-like columns)."),
) -> None:
    """Pre-flight check: files exist and decode, channel counts and shapes agree, no file used twice."""
    from .io.inspect import inspect_source

    report = inspect_source(input, channels=_split(channels), path_columns=_split(path_columns),
                            channel_index=[int(i) for i in _split(channel_index) or []], group_by=_split(group_by))
    out = Console()
    out.print(report.summary())
    if report.problems:
        for p in report.problems[:50]:
            out.print(f"[red]problem:[/red] {p}")
        raise typer.Exit(2)


@app.command()
def doctor() -> None:
    """Versions, available devices and a one-image self-test."""
    from .doctor import run_doctor

    ok = run_doctor(Console())
    if not ok:
        raise typer.Exit(1)


@app.command("sample-data")
def sample_data(output: Path = typer.Argument(Path("microsnoop-samples"), help="Folder to write the sample images to.")) -> None:
    """Write real sample images (Cellpose test images shipped with scellseg) as per-channel TIFFs + masks."""
    from .io.samples import export_samples

    n = export_samples(output)
    console.print(f"wrote {n} sample fields to {output} (channels: _nuclei.tif, _cyto.tif; masks in masks/)")


@app.command()
def profile(
    input: Path = typer.Argument(..., help="Embeddings/profiles file (.parquet, .h5, .h5ad) with Metadata_* columns."),
    output: Path = typer.Option(..., "--output", "-o", help="Profiles out (.parquet, .h5, .h5ad); treatments go to <output>.treatments.<ext>."),
    controls: str = typer.Option('Metadata_Control == "negative"', "--controls", help="pandas query selecting the negative controls."),
    aggregate: Optional[str] = typer.Option(None, "--aggregate", help="First aggregate by these columns, e.g. Metadata_Plate,Metadata_Well."),
    method: str = typer.Option("mean", "--method", help="Aggregation: mean | median."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Per-plate normalisation to the controls: standardize | mad_robustize."),
    sphere: bool = typer.Option(False, "--sphere", help="ZCA-cor whitening fitted on the controls, regularised at the eigenvalue knee."),
    sphere_by: str = typer.Option("Metadata_Plate", "--sphere-by", help="Batch columns for per-batch sphering; 'global' for one fit."),
    treatment: Optional[str] = typer.Option(None, "--treatment", help="Finally aggregate per treatment by these columns."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Aggregate, normalise against negative controls, sphere and aggregate per treatment."""
    from .profiling.pipeline import ProfileSettings, run_profile

    s = ProfileSettings(controls=controls, aggregate=_split(aggregate), aggregate_method=method, normalize=normalize,
                        sphere=sphere, sphere_by=None if sphere_by == "global" else _split(sphere_by),
                        treatment=_split(treatment))
    out = run_profile(input, output, s, overwrite=overwrite, command=command_line())
    console.print("wrote " + ", ".join(f"{k} to {v}" for k, v in out.items()))


@app.command()
def plate(
    manifest: Path = typer.Argument(..., help="CellProfiler LoadData CSV: one row per field, FileName_<channel> + Metadata_* columns."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (cells/fields/wells/treatments tables, report.json, report.md)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model or checkpoint (default: the shipped default)."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Channels to embed, e.g. GFP,DNA (default: all FileName_* columns)."),
    segment_channel: str = typer.Option("DNA", "--segment-channel", help="Channel to segment cells/nuclei on."),
    segmenter: str = typer.Option("cellpose", "--segmenter", help="cellpose | classical | masks (with --masks) | centres (with --centres)."),
    masks: Optional[str] = typer.Option(None, "--masks", help="User label masks: a manifest column (e.g. FileName_NucleiMask) or a folder with one mask per field, named like the segment channel's file."),
    centres: Optional[Path] = typer.Option(None, "--centres", "--centers", help="CSV of cell centres (*_Location_Center_X/Y; ImageNumber or shared Metadata_* columns)."),
    centre_size: Optional[int] = typer.Option(None, "--centre-size", help="Crop side (px) around each given centre (default 2 x --diameter, else 32)."),
    keep_border: bool = typer.Option(False, "--keep-border", help="Also crop cells touching the field's border (skipped by default)."),
    preview: int = typer.Option(4, "--preview", help="Save a PNG montage of this many crops per field (previews/; report.html shows them; 0: none)."),
    save_masks: bool = typer.Option(False, "--save-masks", help="Keep each field's label image (masks/<field>.tif) for audit."),
    diameter: Optional[float] = typer.Option(None, "--diameter", help="Object diameter in pixels (default: estimated)."),
    segment_precision: str = typer.Option("auto", "--segment-precision", help="Cellpose network: auto (bf16 where native, ~2.6x faster on CPU) | fp32."),
    mode: str = typer.Option("crop", "--mode", help="crop | rescale | tile."),
    rescale_constant: Optional[float] = typer.Option(None, "--rescale-constant", help="Rc of the cell-region crop."),
    crop_size: Optional[int] = typer.Option(None, "--crop-size", help="Sta: crops are zero-padded to this size."),
    max_cells: Optional[int] = typer.Option(None, "--max-cells", help="Embed at most this many cells per field (seeded random subset)."),
    controls: str = typer.Option('Metadata_Control == "negative"', "--controls", help="pandas query selecting negative-control wells."),
    positive: str = typer.Option('Metadata_Control == "positive"', "--positive", help="pandas query selecting positive-control wells ('' for none)."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="standardize | mad_robustize against the negative controls, per plate."),
    sphere: bool = typer.Option(True, "--sphere/--no-sphere", help="ZCA-cor sphering fitted on the negative controls (knee-regularised)."),
    treatment: Optional[str] = typer.Option(None, "--treatment", help="Treatment columns (default: inferred, e.g. Metadata_RowBlock,Metadata_DoseIndex)."),
    fmt: str = typer.Option("parquet", "--format", help="parquet | h5 | h5ad for the tables."),
    save_cells: bool = typer.Option(False, "--save-cells", help="Also write the per-cell table."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: all available)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """A plate end to end: segment -> crop -> embed -> fields -> wells -> normalise/sphere -> report."""
    from .pipelines.plate import PlateSettings, run_plate

    s = PlateSettings(channels=_split(channels), segment_channel=segment_channel, segmenter=segmenter, diameter=diameter,
                      mode=mode, rescale_constant=rescale_constant, crop_size=crop_size, max_cells=max_cells,
                      model=model, batch_size=batch_size, device=device, precision=precision, controls=controls,
                      positive=positive or None, normalize=normalize, sphere=sphere, treatment=_split(treatment),
                      fmt=fmt, save_cells=save_cells, masks=masks, centres=str(centres) if centres else None,
                      centre_size=centre_size, keep_border=keep_border, preview=preview, save_masks=save_masks,
                      threads=threads, segment_precision=segment_precision)
    from .io.readers import read_csv

    n_fields = len(read_csv(manifest)) if manifest.exists() else 0
    bar, advance = progress_bar(n_fields, "fields")
    with bar:
        res = run_plate(manifest, output, s, overwrite=overwrite, command=command_line(), progress=advance)
    r = res.report
    console.print(f"{r.get('n_wells')} wells, Z' = {r.get('z_prime', float('nan')):.3f}, mean mAP = "
                  f"{r.get('mean_map', float('nan')):.3f}; report in {res.files.get('report_html', res.files['report_md'])}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A folder written by `microsnoop plate` or `microsnoop benchmark`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default: RUN_DIR/report.html)."),
    score: str = typer.Option("control", "--score", help="Plates: score the plate map opens on: control | cells | found | map."),
) -> None:
    """One self-contained HTML report (no network needed to open it) of a plate or benchmark run."""
    from .evaluate.html_report import write_html_report

    path = write_html_report(run_dir, output, score=score)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def segment(
    input: Path = typer.Argument(..., help="images.npy (N,C,H,W) or its set folder, a LoadData CSV, a folder of images, or one image."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder: masks.npy (array inputs) or one <file stem>.tif per image, and segmentation.json."),
    channel: Optional[str] = typer.Option(None, "--channel", help="Channel to segment, by name or index (default: DNA if present, else the first)."),
    segmenter: str = typer.Option("cellpose", "--segmenter", help="cellpose | classical."),
    diameter: Optional[float] = typer.Option(None, "--diameter", help="Object diameter in pixels (default: estimated per image)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="(N, H, W) masks.npy to score against: object F1 at IoU 0.5."),
    segment_precision: str = typer.Option("auto", "--segment-precision", help="Cellpose network: auto | fp32 | bf16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Segment one channel of every image (Cellpose or classical) and write the label images."""
    from .embed.engine import configure_threads
    from .io.readers import open_source
    from .pipelines.fields import segment_to_folder

    configure_threads(threads)
    src = input / "images.npy" if input.is_dir() and (input / "images.npy").exists() else input
    n = len(open_source(src)) if src.exists() else 0
    bar, advance = progress_bar(n, "segment")
    with bar:
        summary = segment_to_folder(input, output, channel, segmenter, diameter, truth, overwrite,
                                    precision=segment_precision, progress=advance)
    msg = f"{summary['objects_found']} objects in {summary['n_images']} images -> {output}"
    if "iou_0.5" in summary:
        m = summary["iou_0.5"]
        msg += (f"; vs {summary['objects_true']} true objects: F1@0.5 {m['f1']:.3f} (precision {m['precision']:.3f}, "
                f"recall {m['recall']:.3f})")
    console.print(msg)


@app.command()
def benchmark(
    datasets: List[Path] = typer.Argument(..., help="Benchmark set folders (images.npy, metadata.csv, dataset.json with protocols)."),
    model: List[str] = typer.Option(..., "--model", "-m", help="Registered model or checkpoint; repeat for several."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder (report.json, report.md, figures/, cache/)."),
    plot: str = typer.Option("umap", "--plot", help="umap | pca | none: 2-D map of each set's embeddings."),
    fields_mode: Optional[str] = typer.Option(None, "--fields-mode", help="Sets of kind 'fields': crop (segment, crop cells, average; default) | rescale | tile."),
    fields_segmenter: Optional[str] = typer.Option(None, "--fields-segmenter", help="Sets of kind 'fields': cellpose (default) | classical | masks (the set's masks.npy)."),
    crop_size: Optional[int] = typer.Option(None, "--crop-size", help="Sets of kind 'fields': Sta, the crop/tile/rescale size (default: the model's input, else 224)."),
    max_cells: Optional[int] = typer.Option(None, "--max-cells", help="Sets of kind 'fields': embed at most this many cells per field (seeded)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: all available)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Planes per forward pass (default: auto, by pixels)."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto."),
) -> None:
    """Score models on labelled sets (kNN, MLP cross-validation); embeddings cached per data + model sha256."""
    from .evaluate import benchmark_and_report as run
    from .evaluate.report import rich_tables

    if plot not in ("umap", "pca", "none"):
        raise MicrosnoopError(f"--plot must be umap, pca or none, not '{plot}'")
    res, paths = run(datasets, model, output, plot=plot, device=device, precision=precision, batch_size=batch_size,
                     fields_mode=fields_mode, progress_factory=progress_bar,
                     fields_options={"segmenter": fields_segmenter, "crop_size": crop_size, "max_cells": max_cells},
                     threads=threads,
                     notify=lambda m: console.print(f"[yellow]{m}[/yellow]", highlight=False))
    out = Console()
    out = out if out.is_terminal else Console(width=160)  # logs/CI: do not squeeze the columns into 80
    for table in rich_tables(res):
        out.print(table)
    console.print(f"wrote {len(res.records)} scores to {paths['json']} and {paths['md']}"
                  + (f"; open {paths['html']} in a browser" if paths.get("html") else ""))



def parse_overrides(items: List[str]) -> dict:
    """``KEY=VALUE`` pairs; VALUE is JSON when it parses (numbers, true/false, lists), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MicrosnoopError(f"--set expects KEY=VALUE, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Folder of images, or a manifest.csv (path, modality) of them."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: config.json, checkpoint.pt, model.safetensors, log.csv."),
    method: str = typer.Option("mae-unet", "--method", help="Registered pretext method."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from a registered model or checkpoint (fine-tuning)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its checkpoint, bit-for-bit."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Crop size in px (default 112)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: epochs x epoch-images / batch)."),
    epochs: Optional[float] = typer.Option(None, "--epochs"),
    epoch_images: Optional[int] = typer.Option(None, "--epoch-images", help="Sampled images per epoch (paper: 12,000)."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps"),
    mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="mae-unet: share of 16x16 patches zeroed (0.25)."),
    label: Optional[str] = typer.Option(None, "--label", help="cytoself: metadata column of the identity label (Metadata_Protein)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="paired-inpainting: encoder layer (1-5) the embedding is read from (4)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16 (CUDA)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loading processes."),
    holdout: Optional[int] = typer.Option(None, "--holdout", help="Images per modality kept out of training."),
    device: str = typer.Option("cpu", "--device"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Method config KEY=VALUE (JSON value), repeatable, e.g. --set encoder_lr_scale=0.1."),
) -> None:
    """Self-supervised pretraining (default: the paper's masked U-Net recipe)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .train.loop import train as run_train

    opts = dict(input_size=input_size, batch_size=batch_size, steps=steps, epochs=epochs, epoch_images=epoch_images,
                lr=lr, warmup_steps=warmup_steps, mask_ratio=mask_ratio, seed=seed, precision=precision,
                checkpoint_every=checkpoint_every, workers=workers, holdout=holdout, init=init,
                label_column=label, layer=layer)
    opts.update(parse_overrides(set_ or []))
    prog = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    task = prog.add_task("train", total=None, info="")

    def advance(step: int, total: int, logs: dict) -> None:
        prog.update(task, completed=step, total=total,
                    info=f"loss {logs['loss']:.4f}  {logs['images_per_s']:.1f} img/s  lr {logs['lr']:.2e}")

    with prog:
        res = run_train(data, output, method=method, resume=resume, device=device, options=opts, progress=advance)
    console.print(f"{res['steps']} steps, {res['images_seen']} images, {res['wall_s']:.0f} s, final loss "
                  f"{res['final_loss']:.4f}; encoder in {res['model']}")



@app.command()
def reconstruct(
    images: List[Path] = typer.Argument(..., help="One or more images; one figure row each."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="U-Net model name or checkpoint (default: the default model)."),
    output: Path = typer.Option(..., "--output", "-o", help="Figure file (.png, .pdf, .svg)."),
    mask_ratio: float = typer.Option(0.25, "--mask-ratio", help="Share of 16x16 patches zeroed."),
    channel: int = typer.Option(0, "--channel", help="Which channel of each image."),
    crop: int = typer.Option(256, "--crop", help="Centre crop in px (0 = whole image)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random patch mask."),
) -> None:
    """Masked input / reconstruction / original side by side (the paper's Fig. 2)."""
    from .models.registry import default_model_name
    from .train.reconstruct import reconstruct_figure

    res = reconstruct_figure(images, model or default_model_name(), output, mask_ratio=mask_ratio, seed=seed,
                             channel=channel, crop=crop or None)
    console.print(f"wrote {res['output']} (masked-pixel MSE: {', '.join(f'{v:.4f}' for v in res['masked_mse'])})")


def main() -> None:
    try:
        app()
    except MicrosnoopError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
