# Sourced on the device machine by its run scripts: `. benchmarks/device/setup.sh KIT` (KIT: from kit.sh).
# Installs the kit's wheels the machine's Python lacks into /tmp/site, puts the faiss stand-in and TF32 on
# every process's path (shim/), unpacks the kit's datasets to ../shared/data unless they are there, and
# prints the versions. Returns non-zero (the caller stops) when any of it fails.
kit=${1:?usage: . benchmarks/device/setup.sh KIT}
missing=()
for module in diffusers jsonargparse docstring_parser typeshed_client pytorch_metric_learning; do
  # (each wheel's file name starts with its module's name)
  python3 -c "import $module" 2>/dev/null || missing+=("$kit"/whl/"$module"-*.whl)
done
if [ ${#missing[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${missing[@]}" || return 1
fi
export PYTHONPATH=/tmp/site:$PWD/benchmarks/device/shim:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -d ../shared/data/face_prior/utkface ] || { mkdir -p ../shared && tar xzf "$kit/data.tgz" -C ../shared; } || return 1
python3 -c "import torch, diffusers, lightning, timm, peft, pytorch_metric_learning, jsonargparse, faiss; \
print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA', \
'diffusers', diffusers.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" || return 1
