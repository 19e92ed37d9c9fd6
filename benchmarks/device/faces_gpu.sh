#!/usr/bin/env bash
# The faces GPU study (benchmarks/configs/utility_faces_gpu.yaml) in one device call of under 10 minutes:
#   here:    bash benchmarks/device/kit.sh
#   device:  run(command="bash benchmarks/device/faces_gpu.sh", carry=[".gpu/faces"], timeout_s=600)
# 1. the generator chain (prior for prior_max_time, cold starts, RL, generation: from noise, and from each
#    identity's own training images at strength 0.5, own50) and the seed-0 real-only recognizers: enough for
#    the report's coverage, quality and samples sections at both shot settings (the samples figure draws the
#    finished sets; the copy-free set is left to the CPU);
# 2. coverage of the cold start and RL generators under the samplers of coverage_sampling_faces_k?.md, and
#    along the 3-shot cold start (python -m benchmarks cold_trajectory, 2.5 min at most);
#    while time is left, the deciding downstream rows (seeds 0-2), each finished stage kept;
# 3. the report of whatever finished, and into $OUT: results.tgz (report md / json / figures), run.tgz (the
#    run folder without checkpoints and weights but the seed-0 recognizers': stage.json files and the
#    synthetic sets, so the rows can be trained on CPU from the GPU generator's sets) and the log.
# BUDGET_S (default 560) bounds the whole script; each phase ends in time to leave the report its minute.
# JOBS / THREADS (default 4 / 3: 16 cores) are the study's --jobs / --threads.
# A dry run on CPU (the quick overlay with the small preset, its own run folder; the kit's data is unpacked
# where ../shared lacks it; 5 min in a clean clone on 2 cores, the samplers' coverage cut by its timeout):
#   OUT=/tmp/out BUDGET_S=3000 JOBS=2 THREADS=1 RUN=runs/utility/utility_faces_gpu_quick \
#     STUDY_ARGS="--quick --set vars.accelerator=cpu --set vars.preset=small" bash benchmarks/device/faces_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
budget=${BUDGET_S:-560}
out=${OUT:-/tmp/faces_gpu_out}
mkdir -p "$out"
exec > >(tee "$out/faces_gpu.log") 2>&1
. benchmarks/device/setup.sh .gpu/faces || { echo "setup failed"; exit 1; }
cfg=benchmarks/configs/utility_faces_gpu.yaml
run=${RUN:-runs/utility/utility_faces_gpu}
read -r -a extra <<<"${STUDY_ARGS:-}"
res=/tmp/faces_gpu_results
device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
left() { echo $((budget - (SECONDS - start))); }
study() { # seconds, stage patterns...
  local limit=$1
  shift
  echo "[faces_gpu] $(date -u +%T) $((SECONDS - start)) s in; up to $limit s for: $*"
  timeout "$limit" python3 -m benchmarks utility --config "$cfg" --jobs "${JOBS:-4}" --threads "${THREADS:-3}" \
    --out "$res" "${extra[@]}" --only "$@"
  echo "[faces_gpu] exit $? after $((SECONDS - start)) s"
}
study $(($(left) - 60)) prior judge 'k?_real_s0' 'k?_cold_start' 'k?_rl_full' 'k?_gen_cold' 'k?_gen_rl_full' \
  'k?_gen_own50'
# coverage of each generator under other samplers (coverage_sampling_faces_k?.md's settings), on the GPU
for k in 1 3; do
  gens=() sets=()
  for g in cold rl_full own50; do # the study's sets, as in the CPU baseline's tables (own50: faces_own_sdedit.md)
    [ -f "$run/k${k}_gen_$g/synthetic/manifest.jsonl" ] && sets+=("$g=$run/k${k}_gen_$g/synthetic")
  done
  for g in cold_start rl_full; do
    e=$run/k${k}_$g/export/generator
    [ -f "$e/generator.json" ] && gens+=("${g}_w1=$e@dpmsolver:25:0:1" "${g}_w2=$e@dpmsolver:25:0:2"
      "${g}_w4=$e@dpmsolver:25:0:4" "${g}_ddpm50_w2=$e@ddim:50:1:2")
  done
  if [ -d "$run/k${k}_real_s0/export/backbone" ] && [ ${#gens[@]} -gt 0 ] && (($(left) > 180)); then
    timeout 90 python3 -m benchmarks coverage --target ../shared/data/orl_faces --train-per-identity $k \
      --extractor "$run/k${k}_real_s0/export/backbone" --per-identity 10 --device "$device" \
      --out "$res" --name "coverage_sampling_$(basename "$run")_k$k" --sets "${sets[@]}" --generate "${gens[@]}"
    echo "[faces_gpu] coverage k$k: exit $? after $((SECONDS - start)) s"
  fi
done
# coverage along the 3-shot cold start (cold_trajectory_faces_k3.md's measure): does any step of it cover?
c=$run/k3_cold_start/config.yaml
if [ -f "$c" ] && [ -d "$run/k3_real_s0/export/backbone" ] && (($(left) > 240)); then
  n=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['trainer']['max_steps'])" "$c")
  timeout 150 python3 -m benchmarks cold_trajectory --stage "$run/k3_cold_start" --work /tmp/faces_gpu_trajectory \
    --steps "0,$((n / 6)),$((n / 3)),$((n * 2 / 3)),$n" --guidance 2,4 --device "$device" \
    --target ../shared/data/orl_faces --train-per-identity 3 --extractor "$run/k3_real_s0/export/backbone" \
    --out "$res" --name "cold_trajectory_$(basename "$run")_k3"
  echo "[faces_gpu] trajectory k3: exit $? after $((SECONDS - start)) s"
fi
if (($(left) > 150)); then
  study $(($(left) - 75)) 'k?_real_s?' 'k?_erasing_s?' 'k?_rl_selection_s?' 'k?_erasing_rl_selection_s?'
fi
timeout $(($(left) - 15)) python3 -m rgsd_lightning report "$run" --out "$res" --name "$(basename "$run")"
tar czf "$out/results.tgz" -C "$res" . 2>/dev/null
{ find "$run" -type f | grep -v -E '\.ckpt$|/checkpoints/|/lightning_logs/|/export/'
  find "$run"/k?_real_s0/export -type f 2>/dev/null; } | tar czf "$out/run.tgz" -T -
# files come back only up to 16 MiB each: larger, in 15 MiB pieces (cat run.tgz.* | tar xz)
if (($(stat -c %s "$out/run.tgz") > 15 * 1024 * 1024)); then
  split -b 15M -d "$out/run.tgz" "$out/run.tgz." && rm "$out/run.tgz"
fi
ls -la "$out"
echo "[faces_gpu] done in $((SECONDS - start)) s"
