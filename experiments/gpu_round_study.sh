#!/usr/bin/env bash
# One GPU call for issues 18 and 16 (device tool, one H200): the study benchmark's parts and the
# fusion cost of every method on sd15_random. Everything is packed into $OUT before the call's limit.
#
#   bash experiments/gpu_round_study.sh abc      # bench_study (a,b,c), then bench_fusion per method
#   bash experiments/gpu_round_study.sh d        # bench_study (d): compile, cold and warm cache
#   bash experiments/gpu_round_study.sh run      # the whole default seq7_dreambooth run on sd15_random
set -uo pipefail
OUT=${OUT:-/tmp/out}
W=$(mktemp -d /tmp/work.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src:${PYTHONPATH:-}
start=$(date +%s)
left() { local l=$(( ${1} - ($(date +%s) - start) )); [ $l -gt 5 ] && echo $l || echo 5; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

case "${1:-abc}" in
abc|fusion)
  [ "$1" = fusion ] || timeout $(left ${STUDY_SECONDS:-300}) python experiments/bench_study.py model=sd15_random trainer=gpu --parts ${STUDY_PARTS:-a,b,c} \
    ${STUDY_ARGS:-} --out "$W/study" > "$W/study.log" 2>&1; echo "bench_study rc=$?"
  tail -25 "$W/study.log"
  for m in ${FUSION_METHODS:-mix_of_show custom_diffusion orthogonal_adaptation c_lora cns textual_inversion full_kv}; do
    timeout $(left ${DEADLINE:-560}) python experiments/bench_fusion.py --model sd15_random --device cuda --methods $m \
      --out "$W/fusion" > "$W/fusion_$m.log" 2>&1; echo "fusion $m rc=$?"
    tail -6 "$W/fusion_$m.log"
  done
  mkdir -p "$W/fusion_results"
  for f in "$W"/fusion/*/results.json; do [ -f "$f" ] && cp "$f" "$W/fusion_results/$(python -c "import json,sys;print(json.load(open(sys.argv[1]))['results'][0]['method'])" "$f").json"; done
  tar -cf "$OUT/study_abc.tar" -C "$W" study/bench_study.json study.log fusion_results $(cd "$W" && ls fusion_*.log) 2>/dev/null
  if [ -n "${THEN_D:-}" ] && [ $(left 575) -gt 120 ]; then  # the compile part with what time is left
    timeout $(left 575) python experiments/bench_study.py model=sd15_random trainer=gpu --parts d --compile-variants $THEN_D \
      --out "$W/study_d" > "$W/study_d.log" 2>&1; echo "bench_study d rc=$?"
    tail -8 "$W/study_d.log"
    tar -cf "$OUT/study_d.tar" -C "$W" study_d/bench_study.json study_d.log 2>/dev/null
  fi
  ;;
d)
  timeout $(left ${DEADLINE:-570}) python experiments/bench_study.py model=sd15_random trainer=gpu --parts d \
    --compile-variants ${COMPILE_VARIANTS:-full,regional} --out "$W/study" > "$W/study.log" 2>&1; echo "bench_study rc=$?"
  tail -25 "$W/study.log"
  tar -cf "$OUT/study_d.tar" -C "$W" study/bench_study.json study.log 2>/dev/null
  ;;
run)
  export DREAMBOOTH_DIR=$PWD/.bench_data/dreambooth CNS_CACHE=$W/cache
  /usr/bin/time -v timeout $(left ${DEADLINE:-570}) python -m cns_lightning +experiment=seq7_dreambooth model=sd15_random trainer=gpu \
    hydra.run.dir="$W/run" logger=none > "$W/run.log" 2> "$W/run.err"; echo "run rc=$?"
  tail -30 "$W/run.log"; tail -25 "$W/run.err"
  tar -cf "$OUT/run.tar" -C "$W" run.log run.err $(cd "$W" && ls run/summary.json run/report* 2>/dev/null) 2>/dev/null
  ;;
esac
ls -la "$OUT"
