#!/usr/bin/env bash
# The GPU check: what the CPU test suite cannot show, in a few minutes on a machine with NVIDIA GPUs.
#
#   bash scripts/gpu_check.sh [OUT]        # from the repository root, medflowad installed; default OUT runs/gpu_check
#
# 1. training and scoring images/s of the paper's architecture (cifar10_paper: L=3, K=32, hidden 512, batch 64)
#    on one GPU, float32, default layout and channels_last, and with bfloat16 coupling networks in training
#    (train_precision, channels_last) (benchmarks/speed.py, random inputs);
# 2. DDP (torchrun, NCCL) on every GPU present: 60 steps of the same architecture on random images; the
#    model trained, its images/s and the first steps' loss;
# 3. scans per minute of `score` with the demo model on the GPU (sample scans, four copies each);
# 4. how far bf16 and fp16 autocast move slice scores and maps from float32 (the demo model).
# Figures land in OUT as JSON (and the runs' logs); summary.json gathers them with the machine.
set -euo pipefail
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")

for layout in default nhwc; do
  timeout 300 python benchmarks/speed.py --config cifar10_paper --device cuda --steps 20 --layout "$layout" \
    --out "$OUT/speed_paper_$layout.json"
done
timeout 300 python benchmarks/speed.py --config cifar10_paper --device cuda --steps 20 --layout nhwc \
  --train-precision bfloat16 --out "$OUT/speed_paper_nhwc_bf16.json"

python scripts/gpu_check.py train-config "$OUT/train.yaml" "$OUT/train.npz"
timeout 600 torchrun --standalone --nproc_per_node "$GPUS" -m medflowad train -c "$OUT/train.yaml" -o "$OUT/ddp" -q \
  2>&1 | tail -5
test -s "$OUT/ddp/model.safetensors"

timeout 300 python scripts/gpu_check.py scan-rate "$OUT/scans.json"
timeout 300 python scripts/gpu_check.py precision "$OUT/precision.json"

python - "$OUT" <<'EOF'
import json, platform, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
summary = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "torch": torch.__version__, "python": platform.python_version()}
for name in ("speed_paper_default", "speed_paper_nhwc", "speed_paper_nhwc_bf16", "scans", "precision"):
    summary[name] = json.loads((out / f"{name}.json").read_text())
metrics = json.loads((out / "ddp" / "metrics.json").read_text())
summary["ddp"] = {"processes": torch.cuda.device_count(), "images_per_second_rank0_view": metrics["images_per_second"],
                  "steps": metrics["steps"], "skipped_steps": metrics["skipped_steps"],
                  "train_bpd_running": metrics["train_bpd_running"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
