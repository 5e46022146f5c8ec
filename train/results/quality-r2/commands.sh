# 2026-11-25T04:57:51
python -m train.finetune --model /tmp/work/models/smollm2 --attention full --seq-len 8192 --steps 1000 --batch-size 1 --lr 2e-05 --warmup-steps 25 --eval-every 100 --seed 0 --out /tmp/work/quality-r2/finetune-full --overwrite
# 2026-11-25T05:00:09
python -m train.evaluate --model /tmp/work/quality-r2/finetune-full/export --attention full --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'full, fine-tuned' --out /tmp/work/quality-r2/eval/full-ft --no-progress
# 2026-11-25T05:01:27
python -m train.finetune --model /tmp/work/models/smollm2 --attention cca --group-size 16 --window-size 256 --seq-len 8192 --steps 1000 --batch-size 1 --lr 2e-05 --warmup-steps 25 --eval-every 100 --seed 0 --out /tmp/work/quality-r2/finetune-cca-w256 --overwrite
# 2026-11-25T05:03:51
python -m train.evaluate --model /tmp/work/quality-r2/finetune-cca-w256/export --attention cca --group-size 16 --window-size 256 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=256, fine-tuned' --out /tmp/work/quality-r2/eval/cca-w256-ft --no-progress
# 2026-11-25T05:46:08
python -m train.finetune --model /tmp/work/models/smollm2 --attention cca --group-size 16 --window-size 256 --seq-len 8192 --steps 1000 --batch-size 1 --lr 2e-05 --warmup-steps 25 --eval-every 100 --seed 0 --out /tmp/work/quality-r2/finetune-cca-w256 --overwrite
# 2026-11-25T05:48:24
python -m train.evaluate --model /tmp/work/quality-r2/finetune-cca-w256/export --attention cca --group-size 16 --window-size 256 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=256, fine-tuned' --out /tmp/work/quality-r2/eval/cca-w256-ft --no-progress
# 2026-11-25T05:50:45
python -m train.finetune --model /tmp/work/models/smollm2 --attention cca --group-size 16 --window-size 1024 --seq-len 8192 --steps 1000 --batch-size 1 --lr 2e-05 --warmup-steps 25 --eval-every 100 --seed 0 --out /tmp/work/quality-r2/finetune-cca-w1024 --overwrite
# 2026-11-25T05:53:06
python -m train.evaluate --model /tmp/work/quality-r2/finetune-cca-w1024/export --attention cca --group-size 16 --window-size 1024 --lengths 1024 2048 4096 8192 --examples 20 --seed 0 --label 'CCA w=1024, fine-tuned' --out /tmp/work/quality-r2/eval/cca-w1024-ft --no-progress
