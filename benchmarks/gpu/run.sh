#!/usr/bin/env bash
# Run ON THE DEVICE (the device tool's `run`, in the repository root), after
# benchmarks/gpu/prepare.sh ran here and with carry [".carry", ".whl", "data/large"]:
#     bash benchmarks/gpu/run.sh embed train          # stages in order, each logged to $OUT/<stage>.log
# Stages (each well inside one call's 10 minutes on an H100; the tool returns at most 8 files):
#   embed      bench_embed.py on the 10,032 Wikipedia extracts (issue 7, target 1)
#   train      bench_train_speed.py, n=6144/k=32 and n=24576/k=64, CUDA graphs and eager, SAELens (target 2)
#   train98k   the same at n=98304, k=64 with the lr-1e-2 WSD settings (target 2, memory)
#   pipeline   bench_pipeline.py, the whole pipeline on every text of data/large (target 3)
#   growth     bench_pipeline.py at 10k and 50k texts (target 6)
#   processes  `sbert-sae embed` under accelerate launch, two processes on the one GPU (target 5)
# The figures go into benchmarks/README.md by hand, with this command and the device named.
# SMOKE=1 bash benchmarks/gpu/run.sh STAGE... runs every stage HERE, on the CPU, on 1,000 texts and
# tiny SAEs: a minute's check that the script, its flags and the carried wheels work before a
# GPU session spends its device time on them (its figures mean nothing).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
WORK=${TMPDIR:-/tmp}/sbert-sae-bench  # wheels, caches: not sent back with $OUT
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export HF_HOME=/tmp/hf SBERT_SAE_CACHE=/tmp/sbert-sae-cache
MODEL=.carry/minilm-fp16
CORPUS=data/large/corpus.parquet
DEVICE=cuda:0
EMBED_SMALL= TRAIN_SMALL= PIPELINE_SMALL= GROWTH_SIZES=10000,50000
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu
    CORPUS=$WORK/smoke-corpus.parquet
    python3 -c "import pyarrow.parquet as pq, sys; pq.write_table(pq.read_table(sys.argv[1]).slice(0, 1000), sys.argv[2])" \
        data/large/corpus.parquet "$CORPUS" || exit 1
    EMBED_SMALL="--max-texts 200 --repeats 1"
    TRAIN_SMALL="--sizes 512:16 --batch-size 256 --epochs 1"
    PIPELINE_SMALL="--n 512 -k 16 --epochs 2"
    GROWTH_SIZES=300,600
    nvidia-smi() { echo "SMOKE: the CPU"; }
fi
# The device's image is Python 3.12 and lacks keybert and datasets; here (SMOKE) the virtual
# environment has them, and only SAELens' wheels, pure Python, are added.
WHEELS=$([ "${SMOKE:-0}" = 1 ] && echo .whl/saelens/*.whl || echo .whl/*.whl .whl/saelens/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" $WHEELS || exit 1
if [ "${SMOKE:-0}" = 1 ]; then  # what SAELens needs that the device's image has and the environment here may lack
    python3 -m pip install -q --no-deps --target "$WORK/site" einops jaxtyping wadler-lindig requests urllib3 2>&1 | grep -v WARNING
fi
export PYTHONPATH=$PWD:$WORK/site

stage() {
    case "$1" in
    embed) python3 benchmarks/bench_embed.py --dataset $CORPUS --where source=wikipedia --where kind=extract \
               --model $MODEL --device $DEVICE --repeats 2 --variants fp16:4:65536,fp16:8:65536,bf16:4:65536,fp16:4:32768 \
               $EMBED_SMALL --out "$OUT/embed.json" ;;
    train) python3 benchmarks/bench_train_speed.py --dataset $CORPUS --model $MODEL --device $DEVICE --sizes 6144:32,24576:64 --eager \
               $TRAIN_SMALL --out "$OUT/train_speed.json" ;;
    train98k) python3 benchmarks/bench_train_speed.py --dataset $CORPUS --model $MODEL --device $DEVICE --sizes 98304:64 \
               --our-lr 0.01 --our-schedule wsd $TRAIN_SMALL --out "$OUT/train_speed_98k.json" ;;
    pipeline) python3 benchmarks/bench_pipeline.py --dataset $CORPUS --model $MODEL --device $DEVICE $PIPELINE_SMALL \
               --out "$OUT/pipeline.json" ;;
    growth) python3 benchmarks/bench_pipeline.py --dataset $CORPUS --model $MODEL --device $DEVICE --max-texts $GROWTH_SIZES \
               $PIPELINE_SMALL --out "$OUT/pipeline_small.json" ;;
    processes)
        start=$(date +%s)
        python3 -m sbert_sae embed --dataset $CORPUS --model $MODEL --device $DEVICE --cache-dir "$WORK/one" --quiet
        echo "one process: $(( $(date +%s) - start )) s"
        start=$(date +%s)
        python3 -m accelerate.commands.launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
            -m sbert_sae embed --dataset $CORPUS --model $MODEL --device $DEVICE --cache-dir "$WORK/two" --quiet
        echo "rc $? two processes: $(( $(date +%s) - start )) s"
        python3 - "$WORK/one" "$WORK/two" <<'PY'
import pathlib
import sys

import numpy as np

one, two = (sorted(pathlib.Path(d).rglob("embeddings.npy")) for d in sys.argv[1:])
a, b = np.load(one[0], mmap_mode="r"), np.load(two[0], mmap_mode="r")
print("same rows:", a.shape == b.shape, "max |difference|:", float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()))
PY
        rm -rf "$WORK/one" "$WORK/two"
        ;;
    *) echo "unknown stage $1 (embed, train, train98k, pipeline, growth, processes)"; return 2 ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
status=0
for name in "$@"; do
    echo "== $name"
    stage "$name" 2>&1 | tee "$OUT/$name.log" || status=1
done
exit $status
