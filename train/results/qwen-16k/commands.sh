# 2026-12-04T13:32:03
python3 -m train.build_data --tokenizer /root/q/tok --out /root/q/data --tokens 31M --seq-len 16384 --workers 15
# 2026-12-04T13:33:44
python3 -m convert.parts join /root/q/parts /root/q/qwen.gguf
# 2026-12-04T13:33:47
python3 -m convert.qwen25_coder /root/q/qwen-hf --gguf /root/q/qwen.gguf
# 2026-12-04T13:35:19
python3 -m cca_jax.convert /root/q/qwen-hf /root/q/qwen
# 2026-12-04T13:35:26
python3 -m train.finetune --model /root/q/qwen --attention cca --group-size 16 --window-size 1024 --seq-len 16384 --steps 229 --batch-size 8 --grad-accum 1 --lr 2e-05 --warmup-steps 20 --eval-every 0 --seed 0 --out /root/q/quality/finetune-cca-w1024 --overwrite --data /root/q/data --eval-sequences 8 --remat full
# 2026-12-04T13:43:08
python3 -m train.evaluate --model /root/q/quality/finetune-cca-w1024/export --attention cca --group-size 16 --window-size 1024 --lengths 4096 8192 16384 32768 --examples 20 --seed 0 --label CCA\ w=1024\,\ fine-tuned --out /root/q/quality/eval/cca-w1024-ft --no-progress --batch-size 8 --decode-implementation jnp
# 2026-12-04T13:46:19
python3 -m train.evaluate --model /root/q/qwen --attention full --lengths 4096 8192 16384 32768 --examples 20 --seed 0 --label full\,\ as\ is --out /root/q/quality/eval/full --no-progress --batch-size 8 --decode-implementation jnp
# 2026-12-04T13:50:16
python3 -m train.evaluate --model /root/q/qwen --attention cca --group-size 16 --window-size 1024 --lengths 4096 8192 16384 32768 --examples 20 --seed 0 --label CCA\ w=1024\,\ no\ training --out /root/q/quality/eval/cca-w1024 --no-progress --batch-size 8 --decode-implementation jnp
# --- session 2 (2026-12-04, 16:11-16:38 UTC): RUNS='reach&,full-ft-train,hybrid-w1024-ft-train&,full-ft-eval,wait,hybrid-w1024-ft-eval' XLA_PYTHON_CLIENT_PREALLOCATE=false
# 2026-12-04T16:11:29
python3 -m train.build_data --tokenizer /root/q/tok --out /root/q/data --tokens 31M --seq-len 16384 --workers 15
# 2026-12-04T16:13:14
python3 -m convert.parts join /root/q/parts /root/q/qwen.gguf
# 2026-12-04T16:13:17
python3 -m convert.qwen25_coder /root/q/qwen-hf --gguf /root/q/qwen.gguf
# 2026-12-04T16:14:46
python3 -m cca_jax.convert /root/q/qwen-hf /root/q/qwen
# 2026-12-04T16:14:52
# 2026-12-04T16:14:52
python3 -m train.finetune --model /root/q/qwen --attention full --seq-len 16384 --steps 229 --batch-size 8 --grad-accum 1 --lr 2e-05 --warmup-steps 20 --eval-every 0 --seed 0 --out /root/q/quality/finetune-full --overwrite --data /root/q/data --eval-sequences 8 --remat fullpython3 -m train.attention_reach --model /root/q/qwen --length 4096 --window 1024 --top 3 --json /root/q/quality/reach.json

# 2026-12-04T16:24:26
python3 -m train.evaluate --model /root/q/quality/finetune-full/export --attention full --lengths 4096 8192 16384 32768 --examples 20 --seed 0 --label full\,\ fine-tuned --out /root/q/quality/eval/full-ft --no-progress --batch-size 8 --decode-implementation jnp
# 2026-12-04T16:24:26
python3 -m train.finetune --model /root/q/qwen --attention cca --group-size 16 --window-size 1024 --full-attention-layers 11\,16\,17 --seq-len 16384 --steps 229 --batch-size 8 --grad-accum 1 --lr 2e-05 --warmup-steps 20 --eval-every 0 --seed 0 --out /root/q/quality/finetune-hybrid-w1024 --overwrite --data /root/q/data --eval-sequences 8 --remat full
# 2026-12-04T16:34:39
python3 -m train.evaluate --model /root/q/quality/finetune-hybrid-w1024/export --attention cca --group-size 16 --window-size 1024 --lengths 4096 8192 16384 32768 --examples 20 --seed 0 --label hybrid\ w=1024\ \(full\ layers\ 11\,16\,17\)\,\ fine-tuned --out /root/q/quality/eval/hybrid-w1024-ft --no-progress --batch-size 8 --decode-implementation jnp
