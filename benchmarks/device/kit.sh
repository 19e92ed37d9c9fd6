#!/usr/bin/env bash
# Builds the faces GPU study's kit here, in .gpu/faces/ (git ignores .gpu/), for benchmarks/device/faces_gpu.sh:
#   whl/       the wheels the device machine's Python may lack (setup.sh installs only the missing ones)
#   data.tgz   ORL as it is and UTKFace as the study sees it (grayscale 32x32 PNG: benchmarks/device/shrink.py
#              applies the generator transform's PIL steps here, and reading them back gives the same tensors)
# The datasets are read from ../shared/data (research use only: they travel to the device, never into git).
#   bash benchmarks/device/kit.sh            # then: run(command="bash benchmarks/device/faces_gpu.sh",
#                                            #           carry=[".gpu/faces"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=.gpu/faces
data=${DATA:-../shared/data}
PY=${PYTHON:-python3}
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf "$kit" && mkdir -p "$kit/whl" "$kit/stage/data/face_prior/utkface"
# pure-Python wheels at this environment's versions (the device runs Python 3.12)
for pkg in diffusers jsonargparse docstring_parser typeshed_client pytorch-metric-learning; do
  version=$("$PY" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "kit: $pkg is not installed here" >&2; exit 1; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$kit/whl" "$pkg==$version"
done
cp -r "$data/orl_faces" "$kit/stage/data/orl_faces"
cp "$data/face_prior/PROVENANCE.md" "$kit/stage/data/face_prior/"
"$PY" -m benchmarks.device.shrink "$data/face_prior/utkface" "$kit/stage/data/face_prior/utkface"
tar czf "$kit/data.tgz" -C "$kit/stage" data && rm -rf "$kit/stage"
du -sh "$kit" "$kit"/*
