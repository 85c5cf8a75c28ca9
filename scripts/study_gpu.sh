#!/usr/bin/env bash
# Paper-scale transformer study on GPUs: BERT (encoder), T5 (encoder-decoder) and Llama (decoder) pre-trained
# from scratch on the English novels (lm/novels) at 16 bits (bf16) and 1.58 bits, with the code and the
# `novels` protocol of the CPU study (`tritium run TASK --protocol novels`), at larger sizes.
#
# NOT RUN ON A GPU: the script has only run at tiny size on a CPU (STUDY_TINY=1, tests/test_study.py).
#
# Budget (an estimate from FLOP counts, not a measurement): 3 tasks x 5 precisions x 3 seeds x hidden
# 128/256/512/1024, 8 blocks (T5: 8 + 8), 10,000 steps of 128 x 256 tokens (328M tokens per run, about 10
# epochs of the 33M-token training split at vocabulary 8192). Training FLOPs ~ 6 x parameters x tokens:
# 2.0e17 for the 1024-wide Llama or BERT, twice that for T5; the three narrower sizes add a third. At an
# assumed 100 TFLOP/s for bf16 and 20 TFLOP/s for the 1.58-bit runs (BitLinear computes its forward in
# float32, TF32 allowed below; quantizers and norms add memory traffic) on one H100-class GPU:
#   per seed   decoder ~10 h, encoder ~10 h, seq2seq ~19 h  (bf16 0.7 h, each QAT precision 3.7 h, cqat0.5
#              2.2 h, ptq ~0 per task and seed for the decoder; encoder alike; seq2seq ~1.9x)
#   in all     ~120 GPU-hours for 3 seeds (~15 h on 8 GPUs). Start with SEEDS=0 to calibrate: each run
#              writes its train_s to OUT/<task>/results.jsonl.
#
# Usage:
#   scripts/study_gpu.sh                          # all GPUs of this machine (DDP via torchrun), OUT=runs/study_gpu
#   NPROC=4 OUT=/scratch/study scripts/study_gpu.sh
#   SEEDS=0 scripts/study_gpu.sh; SEEDS=1-2 ...   # seeds split over machines or sessions
#   STUDY_TINY=1 scripts/study_gpu.sh             # tiny sizes on the CPU: checks the script end to end
#   scripts/study_gpu.sh --dry-run                # any further options go to every `tritium run`
# Rerunning resumes: finished runs are skipped (OUT/<task>/results.jsonl), unfinished ones continue from
# their newest checkpoint (--resume, every 500 steps); several copies may share OUT (runs are claimed).
# Other settings: PYTHON (python), CORPUS (lm/novels under the data root; or a directory with train.txt and
# valid.txt), PRECISION, COMPILE (a torch.compile backend; inductor on GPUs, none in tiny mode).
set -euo pipefail

PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/study_gpu}
CORPUS=${CORPUS:-lm/novels}
PRECISION=${PRECISION:-bf16,1.58-absmedian+bf16,1.58-absmean+bf16,ptq-1.58-absmedian+bf16,cqat0.5-1.58-absmedian+bf16}

if [[ ${STUDY_TINY:-0} == 1 ]]; then
    NPROC=${NPROC:-1}
    SEEDS=${SEEDS:-1}
    COMPILE=${COMPILE:-}
    SIZE=(--hidden 32 --layers 1 --head-dim 16 --steps 2 --batch-size 4 --seq-len 16 --vocab-size 320
          --warmup 1 --eval-every 2 --eval-batches 1 --threads 1)
else
    NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
    if [[ ${NPROC:-0} -lt 1 ]]; then
        echo "error: no GPU found (nvidia-smi -L); set NPROC, or STUDY_TINY=1 for the tiny CPU check" >&2
        exit 2
    fi
    SEEDS=${SEEDS:-3}
    COMPILE=${COMPILE:-inductor}
    SIZE=(--hidden 128,256,512,1024 --layers 8 --head-dim 64 --steps 10000 --batch-size 128 --seq-len 256
          --vocab-size 8192 --lr 0.001 --warmup 1000 --eval-every 500 --eval-batches 50 --ckpt-every 500)
    # BitLinear's float32 products have integer operands (ternary weights, 8-bit activations): exact in TF32 too
    export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
fi

for task in decoder encoder seq2seq; do
    "$PYTHON" -m tritium run "$task" --protocol novels --corpus "$CORPUS" --precision "$PRECISION" \
        --seeds "$SEEDS" "${SIZE[@]}" ${COMPILE:+--compile "$COMPILE"} --nproc "$NPROC" --resume --no-progress \
        --out "$OUT/$task" "$@"
done
