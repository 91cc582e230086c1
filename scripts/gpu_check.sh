#!/usr/bin/env bash
# The GPU checks, in one go (a lent GPU box with PyTorch + transformers, no network):
#   wheels of torch-optimi in .whl/, tiny shards + tokenizer in .mmbert/tiny (from `make demo`).
# 1. tests/test_cuda.py (FlashAttention-2 varlen = per-document SDPA; bf16 training steps)
# 2. scripts/gpu_stage_check.py: pretrain + midtrain of the tiny recipe on CUDA through run_stage
# 3. training throughput, packed vs padded, small and base shapes at contexts 1024 and 8192 (+ uniform 512)
# Results in $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import inspect, torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as e:
    print("no torch varlen_attn:", e)
try:
    import flash_attn; print("flash_attn", flash_attn.__version__)
except ImportError:
    print("flash_attn not installed")
PY
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt" | tail -15
timeout 120 python3 scripts/gpu_stage_check.py --artifacts .mmbert/tiny --out /tmp/gpu_stage 2>&1 | tee "$OUT/stage.jsonl" | tail -5
for args in "small --context 512 --uniform" "small --context 1024" "small --context 8192" \
            "base --context 1024 --budget 32768" "base --context 8192 --budget 32768"; do
  echo "== bench --shape $args"
  timeout 150 python3 -m mmbert_dagster.train.throughput --shape $args --steps 5 --reps 2 --json "$OUT/bench.jsonl" \
    2>&1 | grep -E "tokens_per_s_best|mfu|speedup_best|slots|kernel|peak_memory|Error|error" | tr -d '\n'; echo
done
echo "== the per-document SDPA loop instead of the varlen kernel (small, 1024, packed only)"
MMBERT_VARLEN_KERNEL=loop timeout 150 python3 -m mmbert_dagster.train.throughput --shape small --context 1024 --steps 3 \
  --reps 1 --variants packed --json "$OUT/bench_loop.jsonl" 2>&1 | grep -E "tokens_per_s_best|mfu|Error" | tr -d '\n'; echo
