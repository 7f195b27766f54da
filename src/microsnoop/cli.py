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
from typing import Any, List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from .core.errors import MicrosnoopError
from .embed import defaults as D

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Embed microscopy images (Microsnoop): single cells, whole fields and plates. "
                       "Options and renamed options: docs/cli.md.")
console = Console(stderr=True)  # progress, warnings and summary lines; silenced by -q
err_console = Console(stderr=True)  # errors: printed even under -q
log = logging.getLogger("microsnoop")

# Options renamed so that one setting has one name in every command (docs/cli.md, "Renamed options").
# The old names still work, hidden from --help, with a one-line deprecation warning.
RENAMED: dict[str, dict[str, str]] = {
    "segment": {"--channel": "--segment-channel"},
    "profile": {"--method": "--aggregate-method"},
    "benchmark": {"--fields-mode": "--mode", "--fields-segmenter": "--segmenter"},
}

# help shared by the commands that have the option, so one setting reads the same everywhere
HELP_DEVICE = "auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps."
HELP_ENGINE = ("CPU inference engine: auto (OpenVINO when installed, else torch; $MICROSNOOP_ENGINE overrides) | torch "
               "| openvino | onnxruntime (from the 'fast' extra that install.sh installs; each export is validated at "
               "cosine >= 0.999 to fp32 on its first batch, else torch runs).")
HELP_OVERWRITE = "Replace an existing output."
HELP_CHANNELS = ("Folder input: channel tokens in file names, e.g. 'w1,w2,w3'. Manifest: channel names of "
                 "FileName_<name> columns to use, in order.")
HELP_PATH_COLUMNS = "Manifest: path columns, one per channel (default: all FileName_* columns)."
HELP_CHANNEL_INDEX = "Keep these planes of multi-channel files, e.g. 0,1 (drops an empty blue plane of RGB PNGs)."
HELP_THREADS = "CPU threads for torch (default: all available)."


class Command(TyperCommand):
    """A typer command that accepts its renamed options' old names (with a warning) and fills lazy help."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, renamed_args(self.name or "", args))

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for param in self.params:  # help that needs imports (e.g. the training methods) only when asked for
            lazy = LAZY_HELP.get((self.name or "", param.name or ""))
            if lazy is not None and not getattr(param, "lazy_done", False):
                param.help = f"{param.help} {lazy()}"
                param.lazy_done = True
        super().format_help(ctx, formatter)


def training_methods_help() -> str:
    """'Registered: mae-unet, dino-vit, ...': the method registry, for train --help."""
    from .train.base import list_methods

    return "Registered: " + ", ".join(m.name for m in list_methods()) + " (docs/methods.md)."


LAZY_HELP = {("train", "method"): training_methods_help}


def renamed_args(command: str, args: list[str]) -> list[str]:
    """Replace the old names of renamed options by the new ones, with a one-line warning on stderr for each.

    Parameters
    ----------
    command : str
        Subcommand name, e.g. ``"segment"`` (its entry of ``RENAMED``).
    args : list of str
        The subcommand's arguments; ``--old=value`` is renamed too, nothing after ``--``.

    Returns
    -------
    list of str
        The arguments with the new option names.
    """
    table = RENAMED.get(command, {})
    out = []
    for i, arg in enumerate(args):
        if arg == "--":  # everything after is an argument, not an option
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if name in table:
            console.print(f"warning: {command} {name} is deprecated; use {table[name]}", highlight=False,
                          markup=False, soft_wrap=True)  # a warning: -q (parsed before) hides it
            arg = table[name] + eq + value
        out.append(arg)
    return out


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _int_list(value: Optional[str], option: str) -> list[int]:
    """'0,1' -> [0, 1]; anything else is a one-line error naming the option."""
    out = []
    for v in _split(value) or []:
        try:
            out.append(int(v))
        except ValueError:
            raise MicrosnoopError(f"{option} expects plane numbers separated by commas (e.g. 0,1), got '{value}'") from None
        if out[-1] < 0:
            raise MicrosnoopError(f"{option} expects plane numbers counted from 0, got '{value}'")
    return out


def _check_out(path: Path, kind: str = "file") -> None:
    from .io.atomic import check_output_path

    check_output_path(path, kind)


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
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=console.quiet)
    task = prog.add_task(label, total=total)
    return prog, lambda n: prog.advance(task, n)


@app.callback()
def _main(verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                      help="More detail: -v logs steps (model, device, timings), -vv debug lines."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only: no progress bars, warnings or "
                                     "summary lines (tables and reports a command prints on stdout still print)."),
          max_pixels: Optional[str] = typer.Option(None, "--max-pixels", help="Refuse images with more pixels than this "
                                                   "(default 200000000; also $MICROSNOOP_MAX_PIXELS), checked from the "
                                                   "file header before decoding.")) -> None:
    if max_pixels is not None:
        from .io.images import MAX_PIXELS_ENV, max_pixels as check

        os.environ[MAX_PIXELS_ENV] = max_pixels
        check()  # a bad value fails now, naming the option
    configure_output(verbose, quiet)


def configure_output(verbose: int, quiet: bool) -> None:
    """Default: warnings, progress and summary lines; -v adds INFO log lines, -vv DEBUG; -q errors only.

    Parameters
    ----------
    verbose : int
        How many times -v was given.
    quiet : bool
        -q: no progress bars, warnings, log or summary lines on stderr (errors still print).
    """
    if quiet and verbose:
        raise MicrosnoopError("-q/--quiet and -v/--verbose contradict each other: give one")
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    reset_output()  # one handler, on the current stderr (a second run in one process replaces it)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.microsnoop_cli = True
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False  # the root logger's handlers would print the same lines again
    console.quiet = quiet
    if quiet:
        warnings.simplefilter("ignore")  # main() scopes this to the one command
    # our own warnings (e.g. "model is untrained") as one plain line, not a source listing
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


@app.command(cls=Command)
def embed(
    input: Path = typer.Argument(..., help=".npy/.npz (N,C,H,W), a folder of TIFF/PNG images, a CSV manifest, or one image."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file: .parquet, .h5 or .h5ad."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model name (see `microsnoop models`) or a checkpoint path. Default: the shipped default model."),
    fmt: Optional[str] = typer.Option(None, "--format", help="parquet | h5 | h5ad (default: from the output suffix)."),
    channels: Optional[str] = typer.Option(None, "--channels", help=HELP_CHANNELS),
    channel_names: Optional[str] = typer.Option(None, "--channel-names", help="Names for the channels, in order, e.g. DNA,Tubulin,Actin (default: dataset.json, tokens, or ch0,ch1...)."),
    channel_index: Optional[str] = typer.Option(None, "--channel-index", help=HELP_CHANNEL_INDEX),
    path_columns: Optional[str] = typer.Option(None, "--path-columns", help=HELP_PATH_COLUMNS),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="Array input: metadata CSV (default: metadata.csv beside it)."),
    chunk_size: int = typer.Option(D.CHUNK_SIZE, "--chunk-size", help="Images read and kept in memory at a time."),
    batch_size: Optional[int] = typer.Option(D.BATCH_SIZE, "--batch-size", help="One-channel planes per forward pass (default: auto, ~1M pixels: 256 planes of 64x64, 20 of 224x224)."),
    device: str = typer.Option(D.DEVICE, "--device", help=HELP_DEVICE),
    precision: str = typer.Option(D.PRECISION, "--precision", help="auto (default: bf16 on CPUs with native bf16 and on CUDA, for models validated in bf16 - cosine >= 0.999 to fp32; else fp32) | fp32 | bf16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per process (default: the CPUs available, divided among torchrun's local ranks)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its finished chunks."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: embed only every n-th chunk from the i-th (1-based; job arrays), then stop; finish with --merge."),
    merge: bool = typer.Option(False, "--merge", help="Write the output from the chunks of all --shard runs (embeds nothing)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=HELP_OVERWRITE),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none | rot4 | d8 (average over 4 rotations / 8 rotations+flips: exactly invariant, 4x / 8x slower). Default: the model's head."),
    levels: Optional[str] = typer.Option(None, "--levels", help="U-Net models: encoder levels pooled: all | last | 1-3 | 2+3. Default: the model's head."),
    pool: Optional[str] = typer.Option(None, "--pool", help="U-Net models: mean | max | meanmax pooling of each level. Default: the model's head."),
    scales: Optional[str] = typer.Option(None, "--scales", help="Input scale factors, vectors concatenated: 1 | 1+1.5 (as given and enlarged 1.5x: dim x 2, ~3.25x the compute). Default: the model's head."),
    engine: str = typer.Option(D.ENGINE, "--engine", help=HELP_ENGINE),
) -> None:
    """Embed images: every channel separately, vectors concatenated in channel order (the model's dim per channel)."""
    from .pipelines.fieldstore import parse_shard

    shard_t = parse_shard(shard)
    if shard_t is not None and merge:
        raise MicrosnoopError("--shard and --merge are separate steps: run each shard, then --merge once")
    from .embed import Embedder, embed_source
    from .embed.backends import check_engine
    from .io import open_source
    from .models.heads import format_scales, parse_scales

    from .io.writers import format_for

    format_for(output, fmt)
    _check_out(output)
    check_engine(engine)  # options before reading anything
    if scales is not None:
        parse_scales(scales)
    src = open_source(input, channels=_split(channels), channel_names=_split(channel_names),
                      path_columns=_split(path_columns), channel_index=_int_list(channel_index, "--channel-index"),
                      metadata=metadata)
    emb = Embedder(model, device=device, precision=precision, batch_size=batch_size, threads=threads,
                   tta=tta, levels=levels, pool=pool, engine=engine, scales=scales)
    log.info("model %s (sha256 %s), device %s, precision %s, tta %s, scales %s, engine %s", emb.encoder.name,
             emb.encoder.sha256[:12], emb.device, emb.precision, emb.encoder.tta,
             format_scales(emb.encoder.scales), emb.engine_choice)
    prog, advance = progress_bar(len(src), "embedding")
    with prog:
        out = embed_source(src, output, fmt=fmt, chunk_size=chunk_size, resume=resume, overwrite=overwrite,
                           command=command_line(), progress=advance, embedder=emb, shard=shard_t, merge=merge)
    if shard_t is not None:
        console.print(f"shard {shard}: its chunks are in {output.name}.partial; when every shard has finished, run "
                      f"the same command with --merge instead of --shard")
        return
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 merged and reports
        return
    console.print(f"wrote {len(src)} images x {len(src.channel_names) * emb.dim} features "
                  f"({', '.join(src.channel_names)}) to {out}")


@app.command(cls=Command)
def models() -> None:
    """List registered models: licence, training data, input size, default head, sha256."""
    from .models import default_model_name, list_models

    table = Table(title="microsnoop models (head options: NAME:levels=all,tta=d8,scales=1+1.5 or embed --levels/--tta/--scales)")
    for col in ("name", "trained on", "input size", "head", "licence", "sha256"):
        table.add_column(col, overflow="fold")
    default = default_model_name()
    for spec in list_models():
        name = spec.name + (" (default)" if spec.name == default else "") + ("" if spec.trained else " [untrained]")
        table.add_row(name, spec.training_data, spec.input_size, spec.head, spec.license, (spec.sha256 or "-")[:16])
    Console().print(table)


@app.command(cls=Command)
def inspect(
    input: Path = typer.Argument(..., help="Input to check before a long run (same forms as `embed`)."),
    channels: Optional[str] = typer.Option(None, "--channels", help=HELP_CHANNELS),
    path_columns: Optional[str] = typer.Option(None, "--path-columns", help=HELP_PATH_COLUMNS),
    channel_index: Optional[str] = typer.Option(None, "--channel-index", help=HELP_CHANNEL_INDEX),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Metadata columns to count images by (default: Plate/Well-like columns)."),
) -> None:
    """Pre-flight check: files exist and decode, channel counts and shapes agree, no file used twice."""
    from .io.inspect import inspect_source

    report = inspect_source(input, channels=_split(channels), path_columns=_split(path_columns),
                            channel_index=_int_list(channel_index, "--channel-index"), group_by=_split(group_by))
    from rich.markup import escape

    out = Console()
    out.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    if report.problems:
        for p in report.problems[:50]:  # one line each, whatever the terminal width
            out.print(f"[red]problem:[/red] {escape(p)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


@app.command(cls=Command)
def doctor() -> None:
    """Versions, available devices and a one-image self-test."""
    from .doctor import run_doctor

    ok = run_doctor(Console())
    if not ok:
        raise typer.Exit(1)


@app.command("sample-data", cls=Command)
def sample_data(output: Path = typer.Argument(Path("microsnoop-samples"), help="Folder to write the sample images to.")) -> None:
    """Write real sample images (Cellpose test images shipped with scellseg) as per-channel TIFFs + masks."""
    from .io.samples import export_samples

    n = export_samples(output)
    console.print(f"wrote {n} sample fields to {output} (channels: _nuclei.tif, _cyto.tif; masks in masks/)")


@app.command(cls=Command)
def profile(
    input: Path = typer.Argument(..., help="Embeddings/profiles file (.parquet, .h5, .h5ad) with Metadata_* columns."),
    output: Path = typer.Option(..., "--output", "-o", help="Profiles out (.parquet, .h5, .h5ad); treatments go to <output>.treatments.<ext>."),
    controls: str = typer.Option('Metadata_Control == "negative"', "--controls", help="Rows of the negative controls: column comparisons, 'in [...]', and/or/not (a safe subset of pandas queries; no @ or code)."),
    aggregate: Optional[str] = typer.Option(None, "--aggregate", help="First aggregate by these columns, e.g. Metadata_Plate,Metadata_Well."),
    aggregate_method: str = typer.Option("mean", "--aggregate-method", help="How --aggregate combines rows: mean | median."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Per-plate normalisation to the controls: standardize | mad_robustize."),
    sphere: bool = typer.Option(False, "--sphere", help="ZCA-cor whitening fitted on the controls, regularised at the eigenvalue knee."),
    sphere_by: str = typer.Option("Metadata_Plate", "--sphere-by", help="Batch columns for per-batch sphering; 'global' for one fit."),
    treatment: Optional[str] = typer.Option(None, "--treatment", help="Finally aggregate per treatment by these columns."),
    overwrite: bool = typer.Option(False, "--overwrite", help=HELP_OVERWRITE),
) -> None:
    """Aggregate, normalise against negative controls, sphere and aggregate per treatment."""
    from .profiling.pipeline import ProfileSettings, run_profile

    if normalize is not None and normalize not in ("standardize", "mad_robustize"):
        raise MicrosnoopError(f"--normalize must be standardize or mad_robustize, not '{normalize}'")
    if aggregate_method not in ("mean", "median"):
        raise MicrosnoopError(f"--aggregate-method must be mean or median, not '{aggregate_method}'")
    s = ProfileSettings(controls=controls, aggregate=_split(aggregate), aggregate_method=aggregate_method, normalize=normalize,
                        sphere=sphere, sphere_by=None if sphere_by == "global" else _split(sphere_by),
                        treatment=_split(treatment))
    out = run_profile(input, output, s, overwrite=overwrite, command=command_line())
    console.print("wrote " + ", ".join(f"{k} to {v}" for k, v in out.items()))


@app.command(cls=Command)
def plate(
    manifest: Path = typer.Argument(..., help="CellProfiler LoadData CSV (one row per field, FileName_<channel> + Metadata_* columns) or an OME-Zarr HCS plate folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (cells/fields/wells/treatments tables, report.json, report.md)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model or checkpoint (default: the shipped default)."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Channels to embed, e.g. GFP,DNA (default: all the plate's channels)."),
    segment_channel: str = typer.Option("DNA", "--segment-channel", help="Nucleus channel to segment on."),
    cyto_channel: Optional[str] = typer.Option(None, "--cyto-channel", help="Whole-cell segmentation: a cytoplasm/membrane channel (e.g. AGP, ER) given to Cellpose with the --segment-channel nucleus channel."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="Plate map CSV (Metadata_Well, optional Metadata_Plate, treatment/control columns) joined on the wells; for OME-Zarr plates."),
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
    controls: Optional[str] = typer.Option(None, "--controls", help="Negative-control wells: column comparisons, 'in [...]', and/or/not (a safe subset of pandas queries). Default: inferred from a Metadata_* column saying negative/DMSO/mock."),
    positive: str = typer.Option("auto", "--positive", help="Positive-control wells, same grammar as --controls (default: inferred from a column saying positive; '' for none)."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="standardize | mad_robustize against the negative controls, per plate."),
    sphere: bool = typer.Option(True, "--sphere/--no-sphere", help="ZCA-cor sphering fitted on the negative controls (knee-regularised; skipped with a warning under 4 control wells)."),
    treatment: Optional[str] = typer.Option(None, "--treatment", help="Treatment columns (default: inferred: compound/treatment + dose/concentration, else Metadata_RowBlock,Metadata_DoseIndex)."),
    fmt: str = typer.Option("parquet", "--format", help="parquet | h5 | h5ad for the tables."),
    save_cells: bool = typer.Option(False, "--save-cells", help="Also write the per-cell table."),
    batch_size: Optional[int] = typer.Option(D.BATCH_SIZE, "--batch-size", help="Cell crops (one-channel planes) per forward pass (default: auto, by pixels)."),
    device: str = typer.Option(D.DEVICE, "--device", help=HELP_DEVICE),
    precision: str = typer.Option(D.PRECISION, "--precision", help="auto (bf16 where native and validated for the model, else fp32) | fp32 | bf16."),
    threads: Optional[int] = typer.Option(None, "--threads", help=HELP_THREADS),
    engine: str = typer.Option(D.ENGINE, "--engine", help=HELP_ENGINE),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted or failed run: reuse its finished fields (and a finished run's fields table)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: compute only every n-th field from the i-th (1-based; job arrays), then stop; finish with --merge."),
    merge: bool = typer.Option(False, "--merge", help="Assemble the plate from the finished fields of all --shard runs (computes none)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=HELP_OVERWRITE),
) -> None:
    """A plate end to end: segment -> crop -> embed -> fields -> wells -> normalise/sphere -> report."""
    from .pipelines.fieldstore import parse_shard, shard_fields
    from .workflows.plate import PlateSettings, run_plate

    _check_out(output, "folder")
    _check_plate_options(manifest, controls, positive, normalize, fmt, treatment)
    s = PlateSettings(channels=_split(channels), segment_channel=segment_channel, segmenter=segmenter, diameter=diameter,
                      mode=mode, rescale_constant=rescale_constant, crop_size=crop_size, max_cells=max_cells,
                      model=model, batch_size=batch_size, device=device, precision=precision, controls=controls,
                      positive=positive or None, normalize=normalize, sphere=sphere, treatment=_split(treatment),
                      fmt=fmt, save_cells=save_cells, masks=masks, centres=str(centres) if centres else None,
                      centre_size=centre_size, keep_border=keep_border, preview=preview, save_masks=save_masks,
                      threads=threads, segment_precision=segment_precision, cyto_channel=cyto_channel,
                      metadata=str(metadata) if metadata else None, engine=engine)
    shard_t = parse_shard(shard)
    if shard_t is None and os.environ.get("WORLD_SIZE", "1") not in ("", "1") and not merge:
        shard_t = (int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]))   # torchrun: one shard per rank
    live: dict = {}

    def on_plan(plan) -> None:          # options checked: say what will be skipped, then show progress
        for w in plan.warnings:
            console.print(f"warning: {w}", highlight=False, soft_wrap=True)
        n = 0 if merge else len(shard_fields(plan.n_fields, shard_t))
        live["bar"], live["advance"] = progress_bar(n, "fields")
        live["bar"].start()

    try:
        res = run_plate(manifest, output, s, overwrite=overwrite, command=command_line(),
                        progress=lambda n: live["advance"](n) if "advance" in live else None,
                        resume=resume, shard=shard_t, merge=merge, on_plan=on_plan)
    finally:
        if "bar" in live:
            live["bar"].stop()
    _print_plate_result(res)


def _check_plate_options(manifest: Path, controls: str | None, positive: str | None, normalize: str | None,
                         fmt: str, treatment: str | None) -> None:
    """The plate options that a run would use only after every field is embedded: checked now, not
    after an hour of work (an OME-Zarr plate's metadata is checked by run_plate's own checks,
    workflows/plate_checks.py)."""
    from .io.omezarr import is_ome_zarr_plate
    from .profiling.query import check_query

    zarr_plate = manifest.is_dir() and is_ome_zarr_plate(manifest)
    if not (manifest.is_file() or zarr_plate):
        raise MicrosnoopError("manifest not found" if not manifest.exists() else
                              "manifest must be a CSV file or an OME-Zarr HCS plate", manifest)
    columns = None if zarr_plate else list(read_csv_columns(manifest))
    if controls is not None and columns is not None:  # None / "auto": inferred from the plate map
        check_query(controls, columns, "--controls")
    if positive and positive != "auto" and columns is not None:
        check_query(positive, columns, "--positive")
    if normalize is not None and normalize not in ("standardize", "mad_robustize"):
        raise MicrosnoopError(f"--normalize must be standardize or mad_robustize, not '{normalize}'")
    if fmt not in ("parquet", "h5", "h5ad"):
        raise MicrosnoopError(f"--format must be parquet, h5 or h5ad, not '{fmt}'")
    missing = [c for c in _split(treatment) or [] if columns is not None and c not in columns]
    if missing:
        raise MicrosnoopError(f"--treatment column(s) {', '.join(missing)} not in the manifest", manifest)


def _print_plate_result(res: Any) -> None:
    """One line: a shard's progress, or the plate's wells, Z', mAP and where the report is."""
    r = res.report
    if "shard" in r:
        console.print(f"shard {r['shard']}: {r['fields_done']} of {r['n_fields']} plate fields finished in "
                      f"{r['partial']}; {r['next']}")
        return
    console.print(f"{r.get('n_wells')} wells, Z' = {r.get('z_prime', float('nan')):.3f}, mean mAP = "
                  f"{r.get('mean_map', float('nan')):.3f}; {len(r.get('warnings', []))} warning(s); report in "
                  f"{res.files.get('report_html', res.files['report_md'])}")


@app.command(cls=Command)
def report(
    run_dir: Path = typer.Argument(..., help="A folder written by `microsnoop plate` or `microsnoop benchmark`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default: RUN_DIR/report.html)."),
    score: str = typer.Option("control", "--score", help="Plates: score the plate map opens on: control | cells | found | map."),
) -> None:
    """One self-contained HTML report (no network needed to open it) of a plate or benchmark run."""
    from .evaluate.html_report import write_html_report

    path = write_html_report(run_dir, output, score=score)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command(cls=Command)
def segment(
    input: Path = typer.Argument(..., help="images.npy (N,C,H,W) or its set folder, a LoadData CSV, a folder of images, or one image."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder: masks.npy (array inputs) or one <file stem>.tif per image, and segmentation.json."),
    segment_channel: Optional[str] = typer.Option(None, "--segment-channel", help="Channel to segment, by name or index (default: DNA if present, else the first)."),
    segmenter: str = typer.Option("cellpose", "--segmenter", help="cellpose | classical."),
    diameter: Optional[float] = typer.Option(None, "--diameter", help="Object diameter in pixels (default: estimated per image)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="(N, H, W) masks.npy to score against: object F1 at IoU 0.5."),
    segment_precision: str = typer.Option("auto", "--segment-precision", help="Cellpose network: auto | fp32 | bf16."),
    device: str = typer.Option(D.DEVICE, "--device", help="Cellpose network: " + HELP_DEVICE),
    threads: Optional[int] = typer.Option(None, "--threads", help=HELP_THREADS),
    engine: str = typer.Option(D.ENGINE, "--engine", help=HELP_ENGINE),
    overwrite: bool = typer.Option(False, "--overwrite", help=HELP_OVERWRITE),
) -> None:
    """Segment one channel of every image (Cellpose or classical) and write the label images."""
    from .core.device import resolve_device
    from .embed.engine import configure_threads
    from .io.dataset import set_images_path
    from .io.readers import open_source
    from .segment.folder import segment_to_folder

    _check_out(output, "folder")
    if diameter is not None and diameter <= 0:
        raise MicrosnoopError("--diameter must be positive")
    configure_threads(threads)
    dev = str(resolve_device(device)) if segmenter == "cellpose" else "cpu"  # classical runs on the CPU
    src = set_images_path(input)
    n = len(open_source(src)) if src.exists() else 0
    bar, advance = progress_bar(n, "segment")
    with bar:
        summary = segment_to_folder(input, output, segment_channel, segmenter, diameter, truth, overwrite,
                                    device=dev, precision=segment_precision, progress=advance, engine=engine)
    msg = f"{summary['objects_found']} objects in {summary['n_images']} images -> {output}"
    if "iou_0.5" in summary:
        m = summary["iou_0.5"]
        msg += (f"; vs {summary['objects_true']} true objects: F1@0.5 {m['f1']:.3f} (precision {m['precision']:.3f}, "
                f"recall {m['recall']:.3f})")
    console.print(msg)


@app.command(cls=Command)
def benchmark(
    datasets: List[Path] = typer.Argument(..., help="Benchmark set folders (images.npy, metadata.csv, dataset.json with protocols)."),
    model: List[str] = typer.Option(..., "--model", "-m", help="Registered model or checkpoint; repeat for several."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder (report.json, report.md, figures/, cache/)."),
    plot: str = typer.Option("umap", "--plot", help="umap | pca | none: 2-D map of each set's embeddings."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Sets of kind 'fields': crop (segment, crop cells, average; default) | rescale | tile."),
    segmenter: Optional[str] = typer.Option(None, "--segmenter", help="Sets of kind 'fields': cellpose (default) | classical | masks (the set's masks.npy)."),
    crop_size: Optional[int] = typer.Option(None, "--crop-size", help="Sets of kind 'fields': Sta, the crop/tile/rescale size (default: the model's input, else 224)."),
    max_cells: Optional[int] = typer.Option(None, "--max-cells", help="Sets of kind 'fields': embed at most this many cells per field (seeded)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=HELP_THREADS),
    batch_size: Optional[int] = typer.Option(D.BATCH_SIZE, "--batch-size", help="Planes per forward pass (default: auto, by pixels)."),
    device: str = typer.Option(D.DEVICE, "--device", help=HELP_DEVICE),
    precision: str = typer.Option(D.PRECISION, "--precision", help="auto (bf16 where native and validated for the model, else fp32) | fp32 | bf16."),
) -> None:
    """Score models on labelled sets (kNN, MLP cross-validation); embeddings cached per data + model sha256."""
    from .evaluate import benchmark_and_report as run
    from .evaluate.report import rich_tables

    if plot not in ("umap", "pca", "none"):
        raise MicrosnoopError(f"--plot must be umap, pca or none, not '{plot}'")
    res, paths = run(datasets, model, output, plot=plot, device=device, precision=precision, batch_size=batch_size,
                     fields_mode=mode, progress_factory=progress_bar,
                     fields_options={"segmenter": segmenter, "crop_size": crop_size, "max_cells": max_cells},
                     threads=threads,
                     notify=lambda m: console.print(f"[yellow]{m}[/yellow]", highlight=False))
    out = Console()
    out = out if out.is_terminal else Console(width=160)  # logs/CI: do not squeeze the columns into 80
    for table in rich_tables(res):
        out.print(table)
    console.print(f"wrote {len(res.records)} scores to {paths['json']} and {paths['md']}"
                  + (f"; open {paths['html']} in a browser" if paths.get("html") else ""))



@app.command(cls=Command)
def compare(
    reports: List[Path] = typer.Argument(..., help="report.json files written by `microsnoop benchmark`."),
    model: str = typer.Option(..., "--model", "-m", help="The model to judge (a model name in the reports)."),
    baseline: Optional[List[str]] = typer.Option(None, "--baseline", help="Model to compare against; repeat for several (default: every other model in the reports)."),
    tol: float = typer.Option(0.005, "--tol", help="A set counts as won or tied when the model is at most this far below the baseline."),
) -> None:
    """Per benchmark set, the model's mean accuracy minus each baseline's, and the sets won or tied (Markdown)."""
    from .evaluate.compare import compare as run_compare, read_records, render

    rows = run_compare(read_records(reports), model, baseline, tol)
    typer.echo(render(rows, model, tol))


@app.command(cls=Command)
def attribution(
    embeddings: Path = typer.Argument(..., help="Output of `microsnoop embed` (.parquet, .h5, .h5ad): per-channel feature blocks."),
    label: str = typer.Option(..., "--label", help="Metadata column to predict, e.g. Metadata_Protein."),
    classifier: str = typer.Option("knn", "--classifier", help="knn (the benchmark's kNN, leave-one-out) | logistic (5-fold logistic regression)."),
    k: int = typer.Option(11, "--k", help="kNN: neighbours voting."),
    exclude_same: Optional[str] = typer.Option(None, "--exclude-same", help="kNN: skip neighbours sharing this column (e.g. Metadata_Image)."),
    repeats: int = typer.Option(3, "--repeats", help="Shuffles averaged per channel block for the permuted accuracy."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffles and folds."),
) -> None:
    """Channel attribution: how much each channel's block of the embedding drives a label's prediction."""
    from .evaluate.attribution import attribution_from_file, render_attribution

    if not embeddings.is_file():
        raise MicrosnoopError("embeddings file not found", embeddings)
    df = attribution_from_file(str(embeddings), label, classifier, {"k": k, "exclude_same": exclude_same}, repeats, seed)
    typer.echo(render_attribution(df))


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


@app.command(cls=Command)
def train(
    data: Path = typer.Option(..., "--data", help="Folder of images, or a manifest.csv (path, modality) of them."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: config.json, checkpoint.pt, model.safetensors, log.csv."),
    method: str = typer.Option("mae-unet", "--method", help="Training (self-supervised pretext) method."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from a registered model or checkpoint (fine-tuning)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its checkpoint, bit-for-bit."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Crop size in px (default 112)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops per optimiser step and rank (default 16, or the method's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: epochs x epoch-images / batch)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs of --epoch-images images each, when --steps is not given (default 1)."),
    epoch_images: Optional[int] = typer.Option(None, "--epoch-images", help="Sampled images per epoch (paper: 12,000)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3, or the method's)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps before the cosine decay (default 100)."),
    mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="mae-unet: share of 16x16 patches zeroed (0.25)."),
    label: Optional[str] = typer.Option(None, "--label", help="cytoself: metadata column of the identity label (Metadata_Protein)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="paired-inpainting: encoder layer (1-5) the embedding is read from (4)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of sampling, crops and initialisation (default 0)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16 (CUDA)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write checkpoint.pt every this many steps, for --resume (default 200)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loading processes."),
    holdout: Optional[int] = typer.Option(None, "--holdout", help="Images per modality kept out of training."),
    device: str = typer.Option(D.DEVICE, "--device", help="auto (CUDA if present, else CPU) | cpu | cuda | cuda:N. Under "
                               "torchrun, cuda = cuda:LOCAL_RANK for each rank (NCCL); cpu ranks use gloo."),
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
    _check_out(output, "folder")
    from .core.distributed import env_dist

    main_rank = env_dist().main  # under torchrun only rank 0 shows progress and the summary
    prog = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=not main_rank or console.quiet)
    task = prog.add_task("train", total=None, info="")

    def advance(step: int, total: int, logs: dict) -> None:
        prog.update(task, completed=step, total=total,
                    info=f"loss {logs['loss']:.4f}  {logs['images_per_s']:.1f} img/s  lr {logs['lr']:.2e}")

    with prog:
        res = run_train(data, output, method=method, resume=resume, device=device, options=opts, progress=advance)
    if main_rank:
        ranks = f" on {res['world_size']} ranks" if res["world_size"] > 1 else ""
        console.print(f"{res['steps']} steps{ranks}, {res['images_seen']} images, {res['wall_s']:.0f} s, final loss "
                      f"{res['final_loss']:.4f}; encoder in {res['model']}")



@app.command(cls=Command)
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


def read_csv_columns(path: Path) -> list[str]:
    """A CSV's header (to check option values against it before any work)."""
    from .io.readers import read_csv

    return [str(c) for c in read_csv(path).columns]


def _one_line(exc: BaseException) -> str:
    """An operating-system error as ``PATH: reason`` (read-only folders, full disks, paths that are files)."""
    if isinstance(exc, OSError):
        path = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        return f"{path}: {reason}" if path else reason
    return str(exc)


def main() -> None:
    try:
        with warnings.catch_warnings():  # -q's filter ends with the command (tests run several in one process)
            app()
    except MicrosnoopError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except ImportError as exc:  # an optional package missing: name the extra that installs it
        from .core.extras import extra_for, missing_package_message

        if not exc.name or extra_for(exc.name) is None:
            raise
        _print_error(missing_package_message(exc.name.split(".")[0], "this command"))
        sys.exit(2)
    except OSError as exc:  # the file system refused: still one line naming the file, never a traceback
        _print_error(_one_line(exc))
        sys.exit(2)
    finally:
        reset_output()  # -q/-v last one command (main() may run again in the same process, or a library call)


def reset_output() -> None:
    """Undo configure_output: the microsnoop logger back to propagating to the root logger, console not quiet."""
    for h in list(log.handlers):
        if getattr(h, "microsnoop_cli", False):
            log.removeHandler(h)
    log.setLevel(logging.NOTSET)
    log.propagate = True
    console.quiet = False


def _print_error(message: str) -> None:
    from rich.markup import escape

    # one line: newlines inside a decoder's message would break it, and [..] must not be read as markup
    line = " ".join(message.split("\n"))
    err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
