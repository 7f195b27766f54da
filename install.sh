#!/usr/bin/env bash
# Installs microsnoop with everything it uses, from this repo's own files.
#   bash install.sh          # package + baselines + plate tools + HTML reports + optional CPU engines (OpenVINO, ONNX Runtime)
#   bash install.sh --test   # the same + pytest
# torch is pinned to the CPU build 2.13.0 (any other spec pulls GBs of CUDA wheels on this platform).
# scellseg (Cellpose weights + sample images) and efficientnet-lite-pytorch are installed without their
# declared dependencies (PyQt5, TensorFlow, torchvision), which microsnoop does not need.
set -euo pipefail
cd "$(dirname "$0")"
extras="baselines,plates,report,fast"
[ "${1:-}" = "--test" ] && extras="$extras,test"
python -m pip install --disable-pip-version-check -q "torch==2.13.0"
python -m pip install --disable-pip-version-check -q -e ".[$extras]"
python -m pip install --disable-pip-version-check -q --no-deps "scellseg==0.1.8" "efficientnet-lite-pytorch==0.1.0"
