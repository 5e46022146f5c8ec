#!/usr/bin/env bash
# One device call of issue 16's experiment (see run_h200.sh), run from the repository root there:
#   start        install the carried wheels, copy the code, launch run_h200.sh in the background
#   part         move the carried GGUF part(s) into $WORK/parts
#   wait SECONDS wait until the pipeline is done or failed, or SECONDS have passed
# Every call ends by printing the progress log and packing what is worth keeping into $OUT.
# RUN_ENV (start only) passes settings to run_h200.sh, e.g. RUN_ENV=RUNS=full-ft for the
# control's session (values without spaces; RUNS takes commas).
# The tree and the carried part must fit in one call's 64 MiB: here, before a session,
#   python -m convert.parts split QWEN.gguf .xfer/parts --part-size SIZE
# with SIZE = 64 MiB minus the tracked files (`git ls-files -z | xargs -0 du -cb | tail -1`),
# less a margin (49200000 when the tree held 16.6 MB; 44M from 18 MB on).
set -uo pipefail
WORK=${WORK:-/root/q}
mode=${1:?mode}
export PYTHONPATH=${SITE:-/tmp/site}:$WORK/code PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case $mode in
    start)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target ${SITE:-/tmp/site} .whl/*.whl || exit 1
        mkdir -p "$WORK/parts" "$WORK/logs" "$WORK/code"
        cp .xfer/parts/parts.json "$WORK/parts/" && cp .xfer/tok.tar.gz "$WORK/"
        cp -r cca_jax cca_kernels train convert pyproject.toml "$WORK/code/"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        # The redirections are the subshell's, so that nothing holds this call's output open.
        (cd "$WORK/code" && exec setsid nohup env ${RUN_ENV:-} bash \
            train/results/qwen-16k/run_h200.sh) > "$WORK/logs/pipeline.log" 2>&1 < /dev/null &
        sleep 20 ;;
    part)
        mv .xfer/parts/part-* "$WORK/parts/" && ls "$WORK/parts" | tr '\n' ' '; echo ;;
    wait)
        end=$((SECONDS + ${2:?seconds}))
        while ((SECONDS < end)); do
            grep -qE '\] (done|FAILED|unknown)' "$WORK/progress.log" 2>/dev/null && break
            sleep 5
        done ;;
esac
echo "--- progress"; cat "$WORK/progress.log" 2>/dev/null
for f in "$WORK"/logs/finetune-*.log; do [ -f "$f" ] && { echo "--- $f"; tr "\r" "\n" < "$f" | grep -v "^\s*$" | tail -n 2 | cut -c1-200; }; done
tail -n 3 "$WORK/logs/pipeline.log" 2>/dev/null
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
# What comes back: the results so far (evaluations, fine-tune metrics, commands, logs).
cd "$WORK" && tar -czf "$OUT/snapshot.tar.gz" progress.log logs quality/commands.sh \
    quality/reach.json quality/eval $(ls -d quality/finetune-*/*.jsonl 2>/dev/null) data/manifest.json \
    2>/dev/null; ls -la "$OUT"
