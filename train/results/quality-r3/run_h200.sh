#!/usr/bin/env bash
# The quality experiment of issue 13 as it ran on one H200 (RESULTS.md). The first device call
# starts it in the background (setsid) from the repository root; it builds the training data
# while the SmolLM2 GGUF arrives in parts over the next calls, then reassembles and converts
# the model and runs train.experiments. Later calls only copy snapshots of $WORK out.
# The sizes can be overridden for a dry run on a CPU (see the variables below).
set -euo pipefail
WORK=${WORK:-/root/q}
PY=${PY:-python3}
TOKENS=${TOKENS:-81M}          # built once; each arm trains on STEPS x BATCH x SEQ of it
SEQ=${SEQ:-8192}
STEPS=${STEPS:-1230}           # 1230 x 8 x 8192 = 80.6M tokens per arm
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-1}
WINDOW=${WINDOW:-1024}
LENGTHS=${LENGTHS:-"1024 2048 4096 8192"}
EXAMPLES=${EXAMPLES:-20}       # x 5 depths = 100 per (task, length)
WORKERS=${WORKERS:-15}
EVAL_ARGS=${EVAL_ARGS:-"--batch-size 8 --decode-implementation jnp"}
mkdir -p "$WORK/logs"
log() { echo "[$(date -u +%FT%TZ)] $*" >> "$WORK/progress.log"; }
trap 'log "FAILED (exit $?) at line $LINENO"' ERR

log "start: $($PY -c 'import jax, flax, transformers; print("jax", jax.__version__, "flax", flax.__version__, "transformers", transformers.__version__, jax.devices()[0].device_kind)')"
$PY -m train.build_data --tokenizer "$WORK/tok" --out "$WORK/data" --tokens "$TOKENS" \
    --seq-len "$SEQ" --workers "$WORKERS" > "$WORK/logs/build_data.log" 2>&1
log "data: $(tail -n 1 "$WORK/logs/build_data.log")"
until $PY -m convert.parts check "$WORK/parts" > /dev/null 2>&1; do sleep 2; done
$PY -m convert.parts join "$WORK/parts" "$WORK/smollm2.gguf" >> "$WORK/logs/model.log" 2>&1
$PY -m convert.smollm2 "$WORK/smollm2-hf" --gguf "$WORK/smollm2.gguf" >> "$WORK/logs/model.log" 2>&1
$PY -m cca_jax.convert "$WORK/smollm2-hf" "$WORK/smollm2" >> "$WORK/logs/model.log" 2>&1
log "model ready"
$PY -m train.experiments --model "$WORK/smollm2" --out "$WORK/quality" --windows "$WINDOW" \
    --group-size 16 --steps "$STEPS" --batch-size "$BATCH" --grad-accum "$ACCUM" \
    --seq-len "$SEQ" --lr 2e-5 --warmup-steps 20 --eval-every 0 --lengths $LENGTHS \
    --examples "$EXAMPLES" --finetune-args "--data $WORK/data --eval-sequences 8" \
    --eval-args "$EVAL_ARGS" > "$WORK/logs/experiments.log" 2>&1
log "done"
