# 2026-11-25T04:39:12
python -m train.finetune --model /tmp/work/models/smollm2 --attention full --seq-len 8192 --steps 500 --batch-size 1 --lr 0.0001 --warmup-steps 25 --eval-every 100 --seed 0 --out /tmp/work/quality/finetune-full --overwrite
# 2026-11-25T04:40:54
python -m train.evaluate --model /tmp/work/quality/finetune-full/export --attention full --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'full, fine-tuned' --out /tmp/work/quality/eval/full-ft --no-progress
# 2026-11-25T04:42:11
python -m train.finetune --model /tmp/work/models/smollm2 --attention cca --group-size 16 --window-size 256 --seq-len 8192 --steps 500 --batch-size 1 --lr 0.0001 --warmup-steps 25 --eval-every 100 --seed 0 --out /tmp/work/quality/finetune-cca-w256 --overwrite
# 2026-11-25T04:43:58
python -m train.evaluate --model /tmp/work/quality/finetune-cca-w256/export --attention cca --group-size 16 --window-size 256 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=256, fine-tuned' --out /tmp/work/quality/eval/cca-w256-ft --no-progress
# 2026-11-25T04:45:55
python -m train.finetune --model /tmp/work/models/smollm2 --attention cca --group-size 16 --window-size 1024 --seq-len 8192 --steps 500 --batch-size 1 --lr 0.0001 --warmup-steps 25 --eval-every 100 --seed 0 --out /tmp/work/quality/finetune-cca-w1024 --overwrite
# 2026-11-25T04:47:39
python -m train.evaluate --model /tmp/work/quality/finetune-cca-w1024/export --attention cca --group-size 16 --window-size 1024 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=1024, fine-tuned' --out /tmp/work/quality/eval/cca-w1024-ft --no-progress
# 2026-11-25T04:49:34
python -m train.evaluate --model /tmp/work/models/smollm2 --attention full --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'full, as is' --out /tmp/work/quality/eval/full --no-progress
# 2026-11-25T04:50:13
python -m train.evaluate --model /tmp/work/models/smollm2 --attention cca --group-size 16 --window-size 256 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=256, no training' --out /tmp/work/quality/eval/cca-w256 --no-progress
# 2026-11-25T04:51:06
python -m train.evaluate --model /tmp/work/models/smollm2 --attention cca --group-size 16 --window-size 1024 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=1024, no training' --out /tmp/work/quality/eval/cca-w1024 --no-progress
