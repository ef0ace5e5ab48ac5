#!/usr/bin/env bash
# One GPU call that rebuilds and measures the micro world (device tool, one H200, 16 cores).
# Jobs run side by side on the one GPU (the micro models leave it mostly idle); each has a time
# cap so that everything is packed into $OUT before the call's 600 s limit.
#
#   bash experiments/micro_gpu_round.sh pretrain   # identity model, the rebuilt UNet, probes of the shipped model
#   bash experiments/micro_gpu_round.sh probe MODEL_DIR IDENTITY_DIR   # probes of a rebuilt model
#   bash experiments/micro_gpu_round.sh rebuild   # VAE + UNet continued on world scenes and random identities
#   bash experiments/micro_gpu_round.sh wide      # a 128-wide text tower, the UNet warm-started into it (new K/V)
#
# Results come back as tar files in $OUT (at most 16 MB each; larger ones split).
set -uo pipefail
OUT=${OUT:-/tmp/out}
W=$(mktemp -d /tmp/work.XXXX)  # a warm machine keeps /tmp: never mix two calls' results
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src:${PYTHONPATH:-}
SHIPPED=src/cns_lightning/assets/micro
PROBE_CONCEPTS=${PROBE_CONCEPTS-dog_patch,cat_tabby,bird_parrot,cup_heart,car_racer,style_neon,style_halftone,scene_island,scene_twinsun}
PROBE_RECIPES=${PROBE_RECIPES-token,cns,cns_x3,kv,kv_1000,unet,unet_1000}
start=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - start) )); }

probes() {  # MODEL IDENTITY OUTDIR: one process per concept, side by side
  local model=$1 ident=$2 dir=$3 pids=()
  [ -f "$ident/config.json" ] || { echo "no identity model at $ident: probes score CLIP-I only"; ident=""; }
  for c in ${PROBE_CONCEPTS//,/ }; do
    timeout $(left ${DEADLINE:-565}) python experiments/micro_probe.py --concepts "$c" --recipes "$PROBE_RECIPES" ${model:+--model "$model"} \
      ${ident:+--identity "$ident"} --out "$dir" ${PROBE_EXTRA:-} > "$dir.$c.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  python experiments/micro_probe.py --summarize "$dir" > "$dir/summary.md"
  cat "$dir".*.log | grep '^\[probe\]' || true
}

pack() {  # NAME PATH...: tar into $OUT, split into 15 MB parts when larger
  local name=$1; shift
  tar -cf "$W/$name.tar" "$@" 2>/dev/null
  if [ "$(stat -c %s "$W/$name.tar")" -gt 15000000 ]; then
    split -b 15000000 -d "$W/$name.tar" "$OUT/$name.tar."
  else
    cp "$W/$name.tar" "$OUT/"
  fi
}

case "${1:-pretrain}" in
pretrain)
  # 1. UNet with cross-attention on every level, warm-started from the shipped UNet (text width 64)
  timeout $(left 560) python -m cns_lightning.microworld.pretrain --out "$W/p64" --seed 0 --workers 5 --unet-attention all \
    --init $SHIPPED --init-parts clip,vae,unet --stages unet,eval --unet-steps ${P64_STEPS:-4000} --unet-batch 512 \
    --unet-lr 3e-4 --unet-max-seconds ${P64_SECONDS:-380} --n-eval 300 --guidances 3 > "$W/p64.log" 2>&1 &
  P64=$!
  # 3. the identity embedding, then its per-concept AUC, then probes of the shipped model with it
  timeout $(left 560) python -m cns_lightning.microworld.identity train --out "$W/identity" --steps ${ID_STEPS:-4000} --batch 512 \
    --workers 6 --max-seconds ${ID_SECONDS:-230} --device cuda > "$W/identity.log" 2>&1
  timeout $(left 560) python -m cns_lightning.microworld.identity eval --model "$W/identity" --out "$W/identity/eval.json" >> "$W/identity.log" 2>&1
  tail -30 "$W/identity.log"
  mkdir -p "$W/probe_shipped"
  probes "" "$W/identity/model" "$W/probe_shipped"
  wait $P64
  tail -6 "$W/p64.log"
  pack identity "$W/identity/model" "$W/identity/eval.json" "$W/identity.log"
  pack probe_shipped "$W/probe_shipped" "$W"/probe_shipped.*.log
  pack p64 "$W/p64/pipeline/unet" "$W/p64/pipeline/vae/config.json" "$W/p64/scores.json" "$W/p64/log.txt" "$W/p64/samples.png" "$W/p64.log"
  ;;
rebuild)  # the micro world's VAE and UNet continued on world scenes plus random identities (issue 14)
  timeout $(left 585) python -m cns_lightning.microworld.pretrain --out "$W/rebuild" --seed 0 --workers 15 \
    --init $SHIPPED --init-parts clip,vae,unet --stages vae,unet,eval --identity-share ${ID_SHARE:-0.3} \
    --vae-steps ${VAE_STEPS:-3000} --vae-batch 256 --vae-lr 5e-4 --vae-max-seconds ${VAE_SECONDS:-150} \
    --unet-steps ${UNET_STEPS:-6000} --unet-batch 512 --unet-lr ${UNET_LR:-3e-4} --unet-max-seconds ${UNET_SECONDS:-270} \
    --n-eval 300 --guidances 3 > "$W/rebuild.log" 2>&1
  tail -25 "$W/rebuild.log"
  pack rebuild "$W/rebuild/pipeline/unet" "$W/rebuild/pipeline/vae" "$W/rebuild/scores.json" "$W/rebuild/log.txt" "$W/rebuild/samples.png" "$W/rebuild/samples.txt" "$W/rebuild.log"
  ;;
wide)  # a new CLIP at text width WIDTH (its text tower becomes the pipeline's), the shipped VAE, the shipped
  # UNet warm-started into the new cross-attention width (K/V new, every other weight copied); scored by
  # the shipped CLIP so the numbers compare with the shipped world's
  timeout $(left 585) python -m cns_lightning.microworld.pretrain --out "$W/wide" --seed 0 --workers 15 \
    --init $SHIPPED --init-parts vae,unet --text-width ${WIDTH:-128} --stages clip,unet,eval --identity-share ${ID_SHARE:-0.3} \
    --clip-steps 6000 --clip-batch 512 --clip-max-seconds ${CLIP_SECONDS:-120} \
    --unet-steps ${UNET_STEPS:-3600} --unet-batch 512 --unet-lr ${UNET_LR:-3e-4} --unet-max-seconds ${UNET_SECONDS:-320} \
    --n-eval 300 --guidances 3 --evaluator $SHIPPED/clip > "$W/wide.log" 2>&1
  tail -25 "$W/wide.log"
  pack wide_pipeline "$W/wide/pipeline"
  pack wide_clip "$W/wide/clip"
  pack wide_logs "$W/wide/scores.json" "$W/wide/log.txt" "$W/wide/samples.png" "$W/wide/samples.txt" "$W/wide/progress.json" "$W/wide.log"
  ;;
continue)  # the shipped UNet pretrained further (background) while the shipped model is probed
  timeout $(left 560) python -m cns_lightning.microworld.pretrain --out "$W/continue" --seed 1 --workers 4 \
    --init $SHIPPED --init-parts clip,vae,unet --stages unet,eval --identity-share ${ID_SHARE:-0.3} \
    --unet-steps ${UNET_STEPS:-4000} --unet-batch 512 --unet-lr ${UNET_LR:-2e-4} --unet-max-seconds ${UNET_SECONDS:-330} \
    --n-eval 300 --guidances 3 > "$W/continue.log" 2>&1 &
  PRE=$!
  mkdir -p "$W/probe"
  probes "" $SHIPPED/identity "$W/probe"
  wait $PRE
  tail -12 "$W/continue.log"
  pack probe "$W/probe" "$W"/probe.*.log
  pack continue "$W/continue/pipeline/unet" "$W/continue/scores.json" "$W/continue/log.txt" "$W/continue/samples.png" "$W/continue.log"
  ;;
probe)  # MODEL IDENTITY: PROBE_CONCEPTS x PROBE_RECIPES
  mkdir -p "$W/probe"
  probes "$2" "$3" "$W/probe"
  pack probe "$W/probe" "$W"/probe.*.log
  ;;
all)  # IDENTITY: the shipped model's probes on all 20 concepts (diagnosis recipes on 9), and a new identity model
  mkdir -p "$W/probe"
  timeout $(left 470) python -m cns_lightning.microworld.identity train --out "$W/identity" --steps ${ID_STEPS:-4000} --batch 512 \
    --workers ${ID_WORKERS:-4} --max-seconds ${ID_SECONDS:-300} --device cuda > "$W/identity.log" 2>&1 &
  ID=$!
  pids=()
  ident=$2
  for c in ${PROBE_CONCEPTS//,/ }; do
    timeout $(left 565) python experiments/micro_probe.py --concepts "$c" --recipes cns,kv,unet,token,cns_x3,cns_r30 \
      --identity "$ident" --out "$W/probe" > "$W/probe.$c.log" 2>&1 &
    pids+=($!)
  done
  for group in dog_bandana,cat_tuxedo,fish_clown rabbit_bowtie,turtle_hex,chair_slat lamp_fringe,house_chimney,vase_rainbow style_scanline,scene_checkroom; do
    timeout $(left 565) python experiments/micro_probe.py --concepts "$group" --recipes cns,kv,unet \
      --identity "$ident" --out "$W/probe" > "$W/probe.${group%%,*}.log" 2>&1 &
    pids+=($!)
  done
  wait $ID
  timeout $(left 560) python -m cns_lightning.microworld.identity eval --model "$W/identity" --out "$W/identity/eval.json" >> "$W/identity.log" 2>&1
  tail -26 "$W/identity.log"
  wait "${pids[@]}"
  python experiments/micro_probe.py --summarize "$W/probe" > "$W/probe/summary.md"
  tail -12 "$W/probe/summary.md"
  pack identity "$W/identity/model" "$W/identity/eval.json" "$W/identity.log"
  pack probe "$W/probe" "$W"/probe.*.log
  ;;
esac
ls -la "$OUT"
echo "round done in $(( $(date +%s) - start )) s"
