#!/usr/bin/env bash
# Issue 16's experiment (Qwen2.5-Coder-0.5B-Instruct, 16K training sequences) on one H200, as it
# runs there: `device_call.sh start` launches this in the background (setsid) from a copy of the
# repository; it builds the training data with the carried tokenizer while the GGUF arrives in
# parts over the next device calls, then checks, materialises and converts the model and runs
# this session's RUNS in order, each command logged to $Q/commands.sh with its start time.
# A device session holds a machine for at most 30 minutes and checkpoints cannot leave it, so
# each session runs some of the comparison's runs; their results are put back under
# $Q/eval/<run> on this side, and `python -m train.experiments --table-only` joins them.
# The run names and command lines are those `train.experiments --dry-run` prints for the same
# settings (the training recipe of the quality experiment: lr 2e-5, 8 sequences per update).
set -Eeuo pipefail   # -E: the ERR trap also fires inside step()
WORK=${WORK:-/root/q}
PY=${PY:-python3}
TOKENS=${TOKENS:-31M}          # built once; each arm trains on STEPS x BATCH x SEQ of it
SEQ=${SEQ:-16384}
STEPS=${STEPS:-229}            # 229 x 8 x 16384 = 30.0M tokens per arm
BATCH=${BATCH:-8}
WINDOW=${WINDOW:-1024}
LENGTHS=${LENGTHS:-"4096 8192 16384 32768"}
EXAMPLES=${EXAMPLES:-20}       # x 5 depths = 100 per (task, length)
WORKERS=${WORKERS:-15}
RUNS=${RUNS:-"cca-w$WINDOW-ft full cca-w$WINDOW"}   # spaces or commas
RUNS=${RUNS//,/ }
EVAL_ARGS=${EVAL_ARGS:-"--batch-size 8 --decode-implementation jnp"}
FT_ARGS=${FT_ARGS:-"--data $WORK/data --eval-sequences 8 --remat full"}
Q=$WORK/quality
MODEL=$WORK/qwen
mkdir -p "$WORK/logs" "$Q/eval"
log() { echo "[$(date -u +%FT%TZ)] $*" >> "$WORK/progress.log"; }
trap 'log "FAILED (exit $?) at line $LINENO"' ERR
step() {   # step NAME COMMAND...: run it, its command line in commands.sh, its output in logs/
    local name=$1; shift
    { echo "# $(date -u +%FT%T)"; printf '%q ' "$@" | sed 's/ $//'; echo; } >> "$Q/commands.sh"
    log "$name: start"
    "$@" > "$WORK/logs/$name.log" 2>&1
    log "$name: done ($(tail -n 1 "$WORK/logs/$name.log" | cut -c1-160))"
}

log "start: $($PY -c 'import jax, flax, transformers; print("jax", jax.__version__, "flax", flax.__version__, "transformers", transformers.__version__, jax.devices()[0].device_kind)')"
mkdir -p "$WORK/tok" && tar -xzf "$WORK/tok.tar.gz" -C "$WORK/tok"
step build_data $PY -m train.build_data --tokenizer "$WORK/tok" --out "$WORK/data" \
    --tokens "$TOKENS" --seq-len "$SEQ" --workers "$WORKERS"
until $PY -m convert.parts check "$WORK/parts" > /dev/null 2>&1; do sleep 2; done
step join $PY -m convert.parts join "$WORK/parts" "$WORK/qwen.gguf"
step materialise $PY -m convert.qwen25_coder "$WORK/qwen-hf" --gguf "$WORK/qwen.gguf"
# The data was tokenised with the tokenizer this side's transformers materialised from the same
# GGUF; the fine-tune refuses a model whose tokenizer differs. Compare, and say so if they do.
$PY - "$WORK/tok" "$WORK/qwen-hf" >> "$WORK/logs/tokenizer_check.log" 2>&1 <<'PYEOF' || { log "tokenizers differ: using the data build's tokenizer files (logs/tokenizer_check.log)"; cp "$WORK"/tok/tokenizer.json "$WORK"/tok/tokenizer_config.json "$WORK/qwen-hf/"; }
import sys
from cca_jax.loading import load_tokenizer
a, b = (load_tokenizer(p) for p in sys.argv[1:3])
import json
text = open(json.__file__, encoding="utf-8").read()
same = (a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids
        and a.eos_token_id == b.eos_token_id and a.bos_token_id == b.bos_token_id
        and a(text)["input_ids"] == b(text)["input_ids"])
print("tokenizers", "identical" if same else "DIFFER", "eos", a.eos_token_id, b.eos_token_id,
      "bos", a.bos_token_id, b.bos_token_id)
sys.exit(0 if same else 1)
PYEOF
step convert $PY -m cca_jax.convert "$WORK/qwen-hf" "$MODEL"
log "model ready"

common=(--seq-len "$SEQ" --steps "$STEPS" --batch-size "$BATCH" --grad-accum 1 --lr 2e-05
        --warmup-steps 20 --eval-every 0 --seed 0)
evaluate() {   # evaluate RUN MODEL LABEL ATTENTION-ARGS...
    local run=$1 model=$2 label=$3; shift 3
    step "eval-$run" $PY -m train.evaluate --model "$model" "$@" --lengths $LENGTHS \
        --examples "$EXAMPLES" --seed 0 --label "$label" --out "$Q/eval/$run" --no-progress \
        $EVAL_ARGS
}
cca=(--attention cca --group-size 16 --window-size "$WINDOW")
hybrid_layers() {   # the hybrid's full layers: $HYBRID_LAYERS, else the reach step's top layers
    if [ -n "${HYBRID_LAYERS:-}" ]; then echo "$HYBRID_LAYERS"; return; fi
    [ -f "$Q/reach.json" ] || one reach
    $PY -c 'import json, sys; print(",".join(map(str, json.load(open(sys.argv[1]))["top"])))' \
        "$Q/reach.json"
}
one() {   # one RUN: a fine-tune and/or an evaluation of the comparison (train.experiments' names)
    case $1 in
        reach)   # which layers' attention reaches furthest in the untouched model
            step reach $PY -m train.attention_reach --model "$MODEL" --length 4096 \
                --window "$WINDOW" --top "${HYBRID_TOP:-3}" --json "$Q/reach.json" ;;
        cca-w$WINDOW-ft) one "cca-w$WINDOW-ft-train"; one "cca-w$WINDOW-ft-eval" ;;
        cca-w$WINDOW-ft-train)
            step "finetune-cca-w$WINDOW" $PY -m train.finetune --model "$MODEL" "${cca[@]}" \
                "${common[@]}" --out "$Q/finetune-cca-w$WINDOW" --overwrite $FT_ARGS ;;
        cca-w$WINDOW-ft-eval)
            evaluate "cca-w$WINDOW-ft" "$Q/finetune-cca-w$WINDOW/export" \
                "CCA w=$WINDOW, fine-tuned" "${cca[@]}" ;;
        full-ft) one full-ft-train; one full-ft-eval ;;
        full-ft-train)
            step finetune-full $PY -m train.finetune --model "$MODEL" --attention full \
                "${common[@]}" --out "$Q/finetune-full" --overwrite $FT_ARGS ;;
        full-ft-eval)
            evaluate full-ft "$Q/finetune-full/export" "full, fine-tuned" --attention full ;;
        hybrid-w$WINDOW-ft) one "hybrid-w$WINDOW-ft-train"; one "hybrid-w$WINDOW-ft-eval" ;;
        hybrid-w$WINDOW-ft-train)
            local layers; layers=$(hybrid_layers)
            step "finetune-hybrid-w$WINDOW" $PY -m train.finetune --model "$MODEL" "${cca[@]}" \
                --full-attention-layers "$layers" "${common[@]}" \
                --out "$Q/finetune-hybrid-w$WINDOW" --overwrite $FT_ARGS ;;
        hybrid-w$WINDOW-ft-eval)   # the layers come from the exported model's config
            local layers; layers=$(hybrid_layers)
            evaluate "hybrid-w$WINDOW-ft" "$Q/finetune-hybrid-w$WINDOW/export" \
                "hybrid w=$WINDOW (full layers $layers), fine-tuned" "${cca[@]}" ;;
        full) evaluate full "$MODEL" "full, as is" --attention full ;;
        cca-w$WINDOW) evaluate "$1" "$MODEL" "CCA w=$WINDOW, no training" "${cca[@]}" ;;
        *) log "unknown run $1"; exit 2 ;;
    esac
}
# RUNS in order; a name ending in & runs in the background (two processes share the GPU, so
# XLA_PYTHON_CLIENT_PREALLOCATE=false belongs in RUN_ENV then); "wait" waits for those.
for run in $RUNS; do
    case $run in
        wait) wait ;;
        *\&) one "${run%&}" & ;;
        *) one "$run" ;;
    esac
done
wait
log "done"
