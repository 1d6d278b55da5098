#!/usr/bin/env bash
# nanochat-jax against PyTorch nanochat on this machine's CPU, side by side: the same documents (the embedded corpus,
# English that ships with Python), each project's own tokenizer trainer at vocab 8,192, fp32, and each project's own
# entry points at the same shapes (depth D, head dim 64, full-context attention, 8 x 512 tokens per step).
#
#   bash bench/vs_nanochat.sh /path/to/nanochat [/path/to/python-with-torch]
#
# The nanochat checkout is run as it is (its `scripts.tok_train`, `scripts.base_train` and `nanochat.engine.Engine`);
# the figures in bench/RESULTS.md come from nanochat commit 92d63d4. The second argument is a Python that has
# nanochat's dependencies (torch, pyarrow, rustbpe, tiktoken, ...); default `python3`.
# Env: DEPTHS="4 6 8" (training), DEC_DEPTHS="4 8" (decode), STEPS (default 30; 50 at d4), WORK (scratch dir,
# default ~/.cache/nanochat_vs), JXPY (this project's python, default .venv/bin/python).
# Training rows: tokens/s = 4,096 / the median step time after warm-up (10 steps at d4, 5 deeper), and the first
# step's time (compile included). Decode rows: random weights, a 32-token prompt, 128 new tokens, greedy, batch 1 and
# 8, end-to-end tokens/s of each Engine's generate (prefill included), median of 3. Runs alternate between the two
# projects; on a shared machine, rerun when `uptime` shows load, and compare the ratios of one run only.
set -euo pipefail
NC=$(cd "${1:?usage: bash bench/vs_nanochat.sh NANOCHAT_DIR [TORCH_PYTHON]}" && pwd)
NCPY=${2:-python3}
JX=$(cd "$(dirname "$0")/.." && pwd)
JXPY=${JXPY:-$JX/.venv/bin/python}
WORK=${WORK:-$HOME/.cache/nanochat_vs}
DEPTHS=${DEPTHS:-4 6 8}
DEC_DEPTHS=${DEC_DEPTHS:-4 8}
LOGS=$WORK/logs
mkdir -p "$LOGS"
export PYTHONDONTWRITEBYTECODE=1

# --- the documents: the embedded corpus, as nanochat's parquet shards (last = val) and as JSONL for us ----------------
if [ ! -f "$WORK/train.jsonl" ]; then
  "$JXPY" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from nanochat_jax.data.documents import embedded_corpus
work = Path(sys.argv[1]); docs = embedded_corpus()
n_val = max(1, len(docs) // 20)
train, val = docs[:-n_val], docs[-n_val:]
shards = work / "ncbase" / "base_data_climbmix"      # nanochat's shard dir (climbmix layout)
shards.mkdir(parents=True, exist_ok=True)
for i, part in enumerate([train, val]):              # nanochat reads the last shard as its validation split
    pq.write_table(pa.table({"text": part}), shards / f"shard_{i:05d}.parquet", row_group_size=1024)
with open(work / "train.jsonl", "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in train)
print(f"{len(train)} train / {len(val)} val documents")
PY
fi
[ -f "$WORK/ncbase/tokenizer/tokenizer.pkl" ] || (cd "$NC" && NANOCHAT_BASE_DIR=$WORK/ncbase "$NCPY" -m scripts.tok_train \
    --vocab-size=8192 > "$LOGS/nc_tok.log" 2>&1)
[ -d "$WORK/jxbase/tokenizer" ] || NANOCHAT_BASE_DIR=$WORK/jxbase "$JXPY" -m scripts.tok_train \
    --data-path "$WORK/train.jsonl" --vocab-size 8192 > "$LOGS/jx_tok.log" 2>&1

# --- training: each project's base_train at the same shapes ---------------------------------------------------------
SHAPE="--head-dim 64 --window-pattern L --max-seq-len 512 --device-batch-size 8 --total-batch-size 4096"
QUIET="--eval-every -1 --core-metric-every -1 --sample-every -1 --save-every -1"
for D in $DEPTHS; do
  S=${STEPS:-30}; [ "$D" = 4 ] && S=${STEPS:-50}
  echo "train d$D: nanochat"
  (cd "$NC" && NANOCHAT_BASE_DIR=$WORK/ncbase NANOCHAT_DTYPE=float32 "$NCPY" -m scripts.base_train --depth $D $SHAPE \
      $QUIET --num-iterations $S --run dummy > "$LOGS/train_nc_d$D.log" 2>&1)
  echo "train d$D: nanochat-jax"
  rm -rf "$WORK/jxbase/checkpoints"
  NANOCHAT_BASE_DIR=$WORK/jxbase JAX_PLATFORMS=cpu "$JXPY" -m scripts.base_train --depth $D $SHAPE $QUIET \
      --num-iterations $S --data-path "$WORK/train.jsonl" --overwrite > "$LOGS/train_jx_d$D.log" 2>&1
done

# --- decode: each project's Engine, random weights ------------------------------------------------------------------
for D in $DEC_DEPTHS; do
  echo "decode d$D: nanochat"
  (cd "$NC" && NANOCHAT_BASE_DIR=$WORK/ncbase NANOCHAT_DTYPE=float32 "$NCPY" - $D > "$LOGS/decode_nc_d$D.log" 2>&1) <<'PY'
import statistics, sys, time
sys.path.insert(0, ".")
import torch
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
depth = int(sys.argv[1]); tok = get_tokenizer(); width = 64 * depth
with torch.device("meta"):
    model = GPT(GPTConfig(sequence_len=512, vocab_size=tok.get_vocab_size(), n_layer=depth, n_head=width // 64,
                          n_kv_head=width // 64, n_embd=width, window_pattern="L"))
model.to_empty(device="cpu"); torch.manual_seed(0); model.init_weights(); model.eval()
engine = Engine(model, tok)
prompt = [tok.get_bos_token_id()] + list(range(300, 331))          # 32 tokens
def run(B, n):
    t0 = time.perf_counter()
    steps = sum(1 for _ in engine.generate(prompt, num_samples=B, max_tokens=n, temperature=0.0))
    return B * steps / (time.perf_counter() - t0)
with torch.inference_mode():
    for B in (1, 8):
        run(B, 8)
        print(f"decode batch {B}: {statistics.median(run(B, 128) for _ in range(3)):.1f} tok/s")
PY
  echo "decode d$D: nanochat-jax"
  JAX_PLATFORMS=cpu PYTHONPATH=$JX "$JXPY" "$JX/bench/decode.py" --depth $D --head-dim 64 --vocab-size 8192 \
      --max-len 160 --prompt-len 32 --new-tokens 128 --batches 1,8 --concurrent 1 --baseline-tokens 8 \
      > "$LOGS/decode_jx_d$D.log" 2>&1
done

# --- the table ------------------------------------------------------------------------------------------------------
"$JXPY" - "$LOGS" "$DEPTHS" "$DEC_DEPTHS" <<'PY'
import re, statistics, sys
logs, depths, dec_depths = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def steps(path):
    return [float(x) for x in re.findall(r"dt:? ([0-9.]+)ms", open(path).read())]
print("| work | nanochat | nanochat-jax | nanochat-jax speed / nanochat speed |\n|---|---|---|---|")
for d in depths:
    skip = 10 if d == "4" else 5
    nc, jx = steps(f"{logs}/train_nc_d{d}.log"), steps(f"{logs}/train_jx_d{d}.log")
    a, b = 4096e3 / statistics.median(nc[skip:]), 4096e3 / statistics.median(jx[skip:])
    print(f"| train d{d}, 8x512 tokens/step (tok/s) | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
for d in depths:
    nc, jx = steps(f"{logs}/train_nc_d{d}.log"), steps(f"{logs}/train_jx_d{d}.log")
    print(f"| first step incl. compile, d{d} (s) | {nc[0] / 1e3:.1f} | {jx[0] / 1e3:.1f} | {nc[0] / jx[0]:.2f}x |")
for d in dec_depths:
    a = dict(re.findall(r"decode batch (\d+): ([0-9.]+)", open(f"{logs}/decode_nc_d{d}.log").read()))
    b = dict(re.findall(r"cached decode, batch\s+(\d+):\s+([0-9.]+)", open(f"{logs}/decode_jx_d{d}.log").read()))
    for B in sorted(set(a) & set(b), key=int):
        x, y = float(a[B]), float(b[B])
        print(f"| decode d{d}, batch {B} (tok/s) | {x:,.0f} | {y:,.0f} | {y / x:.2f}x |")
PY
