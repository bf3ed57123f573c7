#!/usr/bin/env bash
# Real-data ResRep run on 2 CPU cores: the published CIFAR ResNet-20 (option-A shortcuts) fine-tuned on
# CIFAR-10 (JPEG q75), then ResRep (residual mode: compactors on every prunable group) to 45% of the MACs.
# usage: benchmarks/resnet20_cifar_jpeg.sh SHARED_DATA_DIR OUT_DIR
# A short schedule for a CPU budget: masks from iteration 400, +8 channels every 20 iterations, no
# re-selection after iteration 3000 of 6256, group lasso 3e-3 so that masked rows decay within the run.
set -euo pipefail
D=${1:?shared data dir (with cifar10-jpeg/ and cifar-resnet/)}; OUT=${2:?output dir}
PY=${PY:-.venv/bin/python}
DATA="--dataset jpeg-npz --root $D/cifar10-jpeg/cifar10_jpegbytes.npz --batch-size 64 --channels-last --no-progress"
MODEL="--arch resnet20 --shortcut A"
start=$(date +%s)
$PY -m apps.resrep train $DATA $MODEL --checkpoint $D/cifar-resnet/resnet20-12fca82f.th \
    --epochs 2 --lr 0.01 --out $OUT/finetune ${RESUME:+--resume}
mid=$(date +%s)
$PY -m apps.resrep prune $DATA $MODEL --checkpoint $OUT/finetune/last.pt --epochs 8 --lr 0.01 \
    --flops-target 0.45 --before-mask-iters 400 --mask-interval 20 --begin-granularity 8 \
    --mask-stop-iters 3000 --lasso-strength 3e-3 --out $OUT/resrep ${RESUME:+--resume}
end=$(date +%s)
echo "finetune_s=$((mid - start)) resrep_s=$((end - mid))"
