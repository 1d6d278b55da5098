#!/usr/bin/env bash
# The whole nanochat-jax pipeline in one command: tokenizer -> base model -> mid -> SFT -> [RL] -> report.
#
#   bash run_speedrun.sh                          # CPU: the miniature (offline, preset cpu); GPUs: preset d24
#   bash run_speedrun.sh --preset d20             # nanochat's $100 tier (also d26, d32, or a path to a .toml)
#   bash run_speedrun.sh --dry-run --preset d24   # print every command an 8-GPU node would run; run nothing
#   bash run_speedrun.sh --gpus 1                 # the same recipe on one GPU (8x the gradient accumulation)
#   bash run_speedrun.sh --from mid_train         # redo mid_train and every stage after it
#   bash run_speedrun.sh --rl --serve             # also RL and its eval; then serve the web chat on port 8000
#
# Every stage is a plain `python -m scripts.<stage> --config configs/<preset>.toml ...` line (printed before it runs:
# copy it to run a stage by hand). A preset is one TOML file with a table per script plus a [speedrun] table
# (scripts/speedrun_plan.py says what it holds), so adding one needs no change here.
# Restartable: a finished stage leaves a stamp under <base dir>/speedrun/ and is skipped on the next run; a training
# stage that was interrupted continues from its newest checkpoint (--resume). Kill it any time and run it again.
# Set-up: the first run creates .venv and installs the package (jax[cuda12] where NVIDIA GPUs are); where `import jax`
# already sees a GPU and the packages import (offline GPU nodes), nothing is installed. Artifacts go under
# $NANOCHAT_BASE_DIR (default ~/.cache/nanochat_jax).
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
STAGES=(report_reset download tok_train tok_eval pretokenize base_train base_loss base_eval mid_train chat_eval_mid
        chat_sft chat_eval_sft chat_rl chat_eval_rl report)

# ---------------------------------------------------------------------------------------------------------------
# Arguments

PRESET="" GPUS="" FROM="" DRY=0 SERVE=0 RL="" PORT=8000
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=${2:?--preset needs a name}; shift 2 ;;
    --preset=*) PRESET=${1#*=}; shift ;;
    --gpus) GPUS=${2:?--gpus needs a number}; shift 2 ;;
    --gpus=*) GPUS=${1#*=}; shift ;;
    --from) FROM=${2:?--from needs a stage}; shift 2 ;;
    --from=*) FROM=${1#*=}; shift ;;
    --dry-run|--dry_run) DRY=1; shift ;;
    --serve) SERVE=1; shift ;;
    --port) PORT=${2:?--port needs a number}; shift 2 ;;
    --rl) RL=1; shift ;;
    --no-rl|--no_rl) RL=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$GPUS" ] && ! [[ "$GPUS" =~ ^[0-9]+$ ]]; then echo "error: --gpus takes a number, got $GPUS" >&2; exit 2; fi
if [ -n "$FROM" ] && ! [[ " ${STAGES[*]} " == *" $FROM "* ]]; then
  echo "error: --from $FROM: not a stage; the stages are: ${STAGES[*]}" >&2; exit 2
fi

# ---------------------------------------------------------------------------------------------------------------
# Hardware and set-up

NGPU=0
if command -v nvidia-smi >/dev/null 2>&1; then NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ -z "$PRESET" ]; then
  if [ "$NGPU" -gt 0 ]; then PRESET=d24; else PRESET=cpu; fi
fi
if [ -n "$GPUS" ] && [ "$DRY" = 0 ] && [ "$GPUS" -gt "$NGPU" ]; then
  echo "error: --gpus $GPUS but this machine has $NGPU NVIDIA GPU(s)" >&2; exit 2
fi

export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  # planning needs only the standard library and nanochat_jax.core.config: no install
  PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
elif python3 -c 'import jax, flax, optax, orbax.checkpoint, tiktoken, numpy, sys; sys.exit(jax.default_backend() != "gpu")' \
      >/dev/null 2>&1; then
  echo "set-up: jax already sees a GPU and the packages import; installing nothing"
  PY=python3
  command -v python >/dev/null 2>&1 || python() { python3 "$@"; }
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
elif [ "$NGPU" -gt 0 ]; then
  source scripts/setup_env.sh cuda12,serve   # serve: the web chat the run ends with
  PY=python
else
  source scripts/setup_env.sh serve
  PY=python
fi

# ---------------------------------------------------------------------------------------------------------------
# The plan: what the preset derives for this many GPUs (batch sizes, accumulation, steps), without touching a device

if [ -n "$GPUS" ]; then PLAN_GPUS=$GPUS
elif [ "$DRY" = 1 ] && [ "$NGPU" = 0 ]; then PLAN_GPUS=""       # the preset's own node (e.g. 8 GPUs)
else PLAN_GPUS=$NGPU; fi
PLAN=$($PY -m scripts.speedrun_plan --preset "$PRESET" ${PLAN_GPUS:+--gpus "$PLAN_GPUS"}) || exit 2
eval "$PLAN"
CONFIG=$PRESET_FILE
case "$CONFIG" in "$PWD"/*) CONFIG=${CONFIG#"$PWD"/} ;; esac   # configs/d24.toml reads better in the commands
[ -z "$RL" ] && RL=$RL_DEFAULT
[ "$REF_GPUS" = 0 ] && RL=1 || true   # a CPU preset exercises every stage, RL included
BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat_jax}
STAMPS=$BASE_DIR/speedrun

echo "# nanochat-jax speedrun: preset $PRESET_NAME ($CONFIG) on $([ "${PLAN_GPUS:-$REF_GPUS}" = 0 ] && echo "the CPU" || echo "${PLAN_GPUS:-$REF_GPUS} GPU(s)")$([ "$DRY" = 1 ] && echo "; dry run: nothing is executed")"
echo "# base dir: $BASE_DIR"
echo "# base_train: $BASE_PLAN"
[ -n "$MID_PLAN" ] && echo "# mid_train: $MID_PLAN"
[ -n "$SFT_PLAN" ] && echo "# chat_sft: $SFT_PLAN"

if [ "$DRY" = 0 ]; then
  mkdir -p "$STAMPS"
  if [ -f "$STAMPS/preset" ] && [ "$(cat "$STAMPS/preset")" != "$PRESET_FILE" ]; then
    echo "# another preset ran in this base dir before ($(cat "$STAMPS/preset")): starting over"
    rm -f "$STAMPS"/*.done "$STAMPS"/*.started
  fi
  echo "$PRESET_FILE" > "$STAMPS/preset"
  if [ -n "$FROM" ]; then   # forget FROM and every later stage
    after=0
    for s in "${STAGES[@]}"; do
      [ "$s" = "$FROM" ] && after=1
      [ "$after" = 1 ] && rm -f "$STAMPS/$s.done" "$STAMPS/$s.started"
    done
  fi
fi

if [ -n "$GPUS" ] && { [ "$DRY" = 1 ] || [ "$GPUS" -lt "$NGPU" ]; } && [ "$GPUS" -gt 0 ]; then
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))
  echo "export CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  export CUDA_VISIBLE_DEVICES
fi
if [ "$OFFLINE" = 1 ]; then
  echo "export NANOCHAT_OFFLINE=1   # task data: cached or packaged only, no downloads"
  export NANOCHAT_OFFLINE=1
fi
if [ -n "$DATASET" ]; then
  echo "export NANOCHAT_DATASET=$DATASET"
  export NANOCHAT_DATASET=$DATASET
fi

# ---------------------------------------------------------------------------------------------------------------
# Running a stage: print the command, skip it when stamped done, resume it when it was interrupted

has_checkpoint() {   # has_checkpoint KIND: a finished step directory under <base>/checkpoints/KIND/<tag>/
  local d
  for d in "$BASE_DIR/checkpoints/$1/$TAG"/*; do
    [[ "$(basename "$d")" =~ ^[0-9]+$ ]] && return 0
  done
  return 1
}

# stage NAME CKPT_KIND|- COMMAND...   (CKPT_KIND: the checkpoint folder of a training stage, e.g. base)
stage() {
  local name=$1 kind=$2; shift 2
  local cmd=("$@")
  if [ "$DRY" = 1 ]; then echo "${cmd[*]}"; return 0; fi
  if [ -f "$STAMPS/$name.done" ]; then echo "# $name: done in an earlier run, skipped"; return 0; fi
  if [ "$kind" != - ] && has_checkpoint "$kind"; then
    if [ -f "$STAMPS/$name.started" ]; then cmd+=(--resume); else cmd+=(--overwrite); fi
  fi
  echo; echo "${cmd[*]}"
  touch "$STAMPS/$name.started"
  local t0=$SECONDS
  "${cmd[@]}"
  printf 'seconds=%s\ncommand=%s\n' $((SECONDS - t0)) "${cmd[*]}" > "$STAMPS/$name.done"
  rm -f "$STAMPS/$name.started"
}

# Ctrl+C / kill: a stage that saved and exited cleanly on the signal must not be stamped done; bash runs this trap
# when the stage's process returns, before the stamp is written
trap 'echo "# interrupted: run the same command again to resume" >&2; exit 130' INT TERM

P="--config $CONFIG"
T="--model-tag $TAG"
DL_PID=""

# ---------------------------------------------------------------------------------------------------------------
# The stages

# a new report (header: commit, hardware, software, cost) when the run starts from scratch
if [ "$DRY" = 1 ] || ! ls "$STAMPS"/*.done >/dev/null 2>&1; then
  stage report_reset - python -m scripts.report reset --preset "$PRESET_NAME"
fi

# pretraining shards: the first few for the tokenizer now, the rest in the background while it trains
if [ "$SHARDS" -gt 0 ]; then
  stage download - python -m scripts.download_data -n "$TOK_SHARDS"
  if [ "$DRY" = 1 ]; then
    echo "python -m scripts.download_data -n $SHARDS &   # the rest, while the tokenizer trains"
  elif [ ! -f "$STAMPS/pretokenize.done" ]; then
    echo "python -m scripts.download_data -n $SHARDS &"
    python -m scripts.download_data -n "$SHARDS" > "$BASE_DIR/download_data.log" 2>&1 &
    DL_PID=$!
  fi
fi

stage tok_train - python -m scripts.tok_train $P
stage tok_eval - python -m scripts.tok_eval $P

if [ -n "$DL_PID" ] || [ "$DRY" = 1 ] && [ "$SHARDS" -gt 0 ]; then
  echo "wait   # for the shard download"
  if [ -n "$DL_PID" ] && ! wait "$DL_PID"; then
    echo "error: the shard download failed; see $BASE_DIR/download_data.log" >&2; exit 1
  fi
fi
stage pretokenize - python -m scripts.pretokenize $P

# base model: pretraining, then bits per byte and CORE
stage base_train base python -m scripts.base_train $P $BASE_FLAGS
stage base_loss - python -m scripts.base_loss $P $T
stage base_eval - python -m scripts.base_eval $P $T

# midtraining (conversations, multiple choice, tools) and SFT, each followed by the chat evaluation
stage mid_train mid python -m scripts.mid_train $P $T $MID_FLAGS
stage chat_eval_mid - python -m scripts.chat_eval $P --source mid $T
stage chat_sft sft python -m scripts.chat_sft $P --source mid $T $SFT_FLAGS
stage chat_eval_sft - python -m scripts.chat_eval $P --source sft $T
FINAL=sft
if [ "$RL" = 1 ]; then
  stage chat_rl rl python -m scripts.chat_rl $P --source sft $T
  stage chat_eval_rl - python -m scripts.chat_eval $P --source rl $T
  FINAL=rl
fi

# the report: a section per stage, the summary table, plots; always rewritten
if [ "$DRY" = 1 ]; then
  echo "python -m scripts.report generate"
else
  rm -f "$STAMPS/report.done"
  stage report - python -m scripts.report generate
fi

# ---------------------------------------------------------------------------------------------------------------
# How to chat

CHAT="--source $FINAL $T"
echo
echo "# done. The report: $BASE_DIR/report/report.md (plots beside it)"
echo "# chat in the terminal:  python -m scripts.chat_cli $CHAT"
echo "# chat in the browser:   python -m scripts.chat_web $CHAT   (then open http://localhost:8000)"
echo "# curves:                tensorboard --logdir $BASE_DIR/tensorboard"
if [ "$SERVE" = 1 ]; then
  host=$(hostname -I 2>/dev/null | awk '{print $1}'); host=${host:-localhost}
  echo "# serving the web chat: http://$host:$PORT/  (Ctrl+C stops it)"
  if [ "$DRY" = 1 ]; then echo "python -m scripts.chat_web $CHAT --port $PORT"; exit 0; fi
  exec $PY -m scripts.chat_web $CHAT --port "$PORT"
fi
