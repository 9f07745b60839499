#!/usr/bin/env bash
# What one NVIDIA GPU (H100/H200) says about speed at scale, in about 9 minutes: the GPU's name, bf16-vs-fp32
# parity, sampler tokens/s against Hugging Face, train-step tokens/s and FLOP utilisation, and a short GOPO run from a
# Hugging Face folder of Qwen3-0.6B-shaped random weights with the real Qwen3 tokenizer and chat template
# (`--config.model.init_from`; SFT steps + 2 GOPO iterations through the real driver, checkpoints included), then
# its export to Hugging Face folders.
#
#   scripts/gpu_check.sh               # on the GPU machine, from anywhere; OUT=DIR keeps the log in DIR
#   scripts/gpu_check.sh --cpu-smoke   # the same steps at toy sizes on the CPU (checks the script, not speed)
#
# Installs nothing: it expects requirements-gpu.txt (jax[cuda12]) and requirements-test.txt (torch, for the Hugging
# Face side of benchmarks.sampler_vs_hf) in the active Python. Every step has its own timeout; a failed step does
# not stop the others, and the script exits nonzero when any step failed. All output is tee'd to
# $OUT/gpu_check.log when OUT is set.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  LOG="$OUT/gpu_check.log"
else
  LOG=/dev/null
fi
: > "$LOG" 2>/dev/null || true
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # run workdirs (0.6B checkpoints are ~20 GB each)
trap 'rm -rf "$WORK"' EXIT

say() { echo "$*" | tee -a "$LOG"; }

SUMMARY=()
FAILED=0
# run_step NAME TIMEOUT_S CMD...: runs CMD under its own timeout, output tee'd to the log, and records the outcome.
run_step() {
  local name=$1 limit=$2
  shift 2
  say ""
  say "=== [$name] timeout ${limit}s: $*"
  local start=$SECONDS rc
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start)) status=ok
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT"
  elif ((rc != 0)); then
    status="FAILED rc=$rc"
  fi
  [[ $status == ok ]] || FAILED=1
  LAST_OK=$([[ $status == ok ]] && echo 1 || echo 0)
  SUMMARY+=("$(printf '%-28s %-14s %5ds' "$name" "$status" "$took")")
}
record() {  # record NAME STATUS: a step decided without running anything
  say ""
  say "=== [$1] $2"
  [[ $2 == ok* ]] || FAILED=1
  SUMMARY+=("$(printf '%-28s %-14s %5s' "$1" "${2%%:*}" "-")")
}

say "gpu_check $(date -u +%FT%TZ) in $PWD (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
[[ -f requirements-gpu.txt ]] || say "note: requirements-gpu.txt is missing (the GPU install is undocumented)"

if ((SMOKE)); then
  export JAX_PLATFORMS=cpu
  EXPECT=cpu
else
  EXPECT=gpu
  if command -v nvidia-smi > /dev/null; then
    run_step gpu_name 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    record gpu_name "FAILED: nvidia-smi not found"
  fi
fi
run_step jax_devices 60 python -c "
import jax, sys
print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())
sys.exit(0 if jax.default_backend() == '$EXPECT' else f'expected the $EXPECT backend')"
BACKEND_OK=$LAST_OK

# GOPO from a Hugging Face Qwen3 folder (random weights, the real 151,669-token Qwen3 tokenizer and chat template;
# tests/hf_fixtures.py) on the synthetic shop: a few SFT steps and 2 GOPO iterations through experiments.mgshop, small
# batches; the compute is bf16 over fp32 master weights. Then the run is exported as Hugging Face folders.
gopo_run() {  # gopo_run NAME TIMEOUT_S EXTRA_OVERRIDES...
  local name=$1 limit=$2
  shift 2
  run_step "$name" "$limit" python -m experiments.mgshop --config configs/mgshop.py --workdir "$WORK/$name" \
    --config.sft.episodes=8 --config.sft.steps=3 --config.sft.batch_size=4 \
    --config.train.steps=2 --config.train.groups=2 --config.train.group_size=2 --config.train.minibatches=1 \
    --config.train.epochs=1 --config.train.eval_every=2 --config.train.checkpoint_every=2 \
    --config.train.keep_checkpoints=1 --config.eval.episodes=4 --config.eval.judge_dialogues=2 "$@"
}

if ((SMOKE)); then
  run_step dtype_parity 300 python -m benchmarks.dtype_parity --quick
  run_step sampler_vs_hf 300 python -m benchmarks.sampler_vs_hf --quick --profile
  run_step train_mfu 600 python -m benchmarks.train_mfu --quick
  run_step checkpoint_tiny 120 python -m tests.hf_fixtures --out "$WORK/ckpt"
  gopo_run gopo_pretrained_tiny 600 --config.model.init_from="$WORK/ckpt" --config.layout.reply_len=24
  run_step export_tiny 300 python -m gopo_jax.export --workdir "$WORK/gopo_pretrained_tiny" --out "$WORK/hf"
elif ((BACKEND_OK)); then
  run_step dtype_parity 60 python -m benchmarks.dtype_parity
  run_step sampler_vs_hf 90 python -m benchmarks.sampler_vs_hf --repeats 2 --profile
  run_step train_mfu 180 python -m benchmarks.train_mfu --presets small --presets qwen3-0.6b --dtype bfloat16 --steps 3
  # Qwen3-0.6B's shape (28 layers, hidden 1024, 16 heads over 8 KV heads of 128, tied 151,936-row embedding).
  run_step checkpoint_qwen3_0.6b 180 python -m tests.hf_fixtures --out "$WORK/ckpt" --hidden_size 1024 \
    --intermediate_size 3072 --num_layers 28 --num_heads 16 --num_kv_heads 8 --head_dim 128
  gopo_run gopo_qwen3_0.6b 200 --config.model.init_from="$WORK/ckpt" --config.layout.reply_len=24 \
    --config.model.dtype=bfloat16 --config.model.param_dtype=float32 --config.model.scan_unroll=1
  run_step export_qwen3_0.6b 120 python -m gopo_jax.export --workdir "$WORK/gopo_qwen3_0.6b" --out "$WORK/hf"
else
  record benchmarks "SKIPPED: JAX does not see a GPU (see jax_devices)"
fi

say ""
say "=== summary (log: $LOG)"
for line in "${SUMMARY[@]}"; do say "$line"; done
exit "$FAILED"
