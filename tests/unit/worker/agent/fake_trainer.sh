#!/bin/bash
# Test-only stand-in for tune-train, driven by its --config file.
#
# The config holds lines "rank<N>: MODE [ARGS]" or "all: MODE [ARGS]"; modes:
#   exit CODE [FILE]    emit a step event, print to stderr, exit CODE (first waiting
#                       up to 10 s for <output>/FILE to exist, when given)
#   error REASON CODE   emit an error event with REASON, exit CODE
#   sleep               emit a log event, then sleep until killed
#   ignore-term         ignore SIGTERM (so only SIGKILL ends it), sleep
# A rank writes <output>/ready-rank<RANK> once its mode is set up (e.g. SIGTERM
# ignored), so tests can wait for it.
#   garbage             write a non-JSON line, a JSON array and an unterminated line, exit 0
# Every rank first records its command line and environment in
# <output>/env-rank<RANK>.txt and its pid in <output>/pid-rank<RANK>.
set -u
config="" events_fd="" output="" resume=0
args="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --events-fd) events_fd="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --resume) resume=1; shift ;;
    *) echo "fake_trainer: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$output"
read -r _ _ _ _ pgid _ < /proc/$$/stat
{
  echo "args=$args"
  echo "resume=$resume"
  echo "RANK=${RANK-unset}"
  echo "WORLD_SIZE=${WORLD_SIZE-unset}"
  echo "LOCAL_RANK=${LOCAL_RANK-unset}"
  echo "MASTER_ADDR=${MASTER_ADDR-unset}"
  echo "MASTER_PORT=${MASTER_PORT-unset}"
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
  echo "CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER-unset}"
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS-unset}"
  echo "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE-unset}"
  echo "TUNE_JOIN_TOKEN=${TUNE_JOIN_TOKEN-unset}"
  echo "pgid=$pgid"
  echo "fd3=$(readlink /proc/$$/fd/3 2>/dev/null)"
} > "$output/env-rank$RANK.txt.tmp"
mv "$output/env-rank$RANK.txt.tmp" "$output/env-rank$RANK.txt"
echo $$ > "$output/pid-rank$RANK.tmp" && mv "$output/pid-rank$RANK.tmp" "$output/pid-rank$RANK"

mode=$(grep -E "^rank$RANK:" "$config" | head -1 | cut -d: -f2-)
[ -z "$mode" ] && mode=$(grep -E "^all:" "$config" | head -1 | cut -d: -f2-)
set -- $mode
now() { date +%s.%N; }
emit() { printf '%s\n' "$1" >&"$events_fd"; }

echo "rank $RANK starting (stdout)"
echo "rank $RANK stderr line 1" >&2
case "${1:-exit}" in
  exit)
    touch "$output/ready-rank$RANK"
    if [ -n "${3:-}" ]; then
      for _ in $(seq 1000); do [ -e "$output/$3" ] && break; sleep 0.01; done
    fi
    emit "{\"type\":\"step\",\"time\":$(now),\"rank\":$RANK,\"step\":1,\"loss\":2.5}"
    echo "rank $RANK exiting with ${2:-0}" >&2
    exit "${2:-0}" ;;
  error)
    touch "$output/ready-rank$RANK"
    emit "{\"type\":\"error\",\"time\":$(now),\"rank\":$RANK,\"reason\":\"$2\",\"message\":\"fake $2 failure\"}"
    exit "$3" ;;
  sleep)
    touch "$output/ready-rank$RANK"
    emit "{\"type\":\"log\",\"time\":$(now),\"rank\":$RANK,\"level\":\"info\",\"message\":\"sleeping\"}"
    sleep 300
    exit 0 ;;
  ignore-term)
    trap '' TERM
    touch "$output/ready-rank$RANK"
    emit "{\"type\":\"log\",\"time\":$(now),\"rank\":$RANK,\"level\":\"info\",\"message\":\"ignoring SIGTERM\"}"
    while true; do sleep 1; done ;;
  garbage)
    touch "$output/ready-rank$RANK"
    emit "this is not json"
    emit "[1,2,3]"
    printf '{"type":"eval","time":%s,"rank":%s,"step":1,"loss":1.5}' "$(now)" "$RANK" >&"$events_fd"
    exit 0 ;;
  *)
    echo "fake_trainer: unknown mode $1" >&2
    exit 99 ;;
esac
