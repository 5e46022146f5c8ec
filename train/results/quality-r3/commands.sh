# 2026-12-03T22:08:19
python -m train.finetune --model /root/q/smollm2 --attention full --seq-len 8192 --steps 1230 --batch-size 8 --grad-accum 1 --lr 2e-05 --warmup-steps 20 --eval-every 0 --seed 0 --out /root/q/quality/finetune-full --overwrite --data /root/q/data --eval-sequences 8
# 2026-12-03T22:16:34
python -m train.evaluate --model /root/q/quality/finetune-full/export --attention full --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'full, fine-tuned' --out /root/q/quality/eval/full-ft --no-progress --batch-size 8 --decode-implementation jnp
# 2026-12-03T22:17:41
python -m train.finetune --model /root/q/smollm2 --attention cca --group-size 16 --window-size 1024 --seq-len 8192 --steps 1230 --batch-size 8 --grad-accum 1 --lr 2e-05 --warmup-steps 20 --eval-every 0 --seed 0 --out /root/q/quality/finetune-cca-w1024 --overwrite --data /root/q/data --eval-sequences 8
# 2026-12-03T22:24:58
python -m train.evaluate --model /root/q/quality/finetune-cca-w1024/export --attention cca --group-size 16 --window-size 1024 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=1024, fine-tuned' --out /root/q/quality/eval/cca-w1024-ft --no-progress --batch-size 8 --decode-implementation jnp
# 2026-12-03T22:26:18
python -m train.evaluate --model /root/q/smollm2 --attention full --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'full, as is' --out /root/q/quality/eval/full --no-progress --batch-size 8 --decode-implementation jnp
# 2026-12-03T22:27:06
python -m train.evaluate --model /root/q/smollm2 --attention cca --group-size 16 --window-size 1024 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=1024, no training' --out /root/q/quality/eval/cca-w1024 --no-progress --batch-size 8 --decode-implementation jnp
