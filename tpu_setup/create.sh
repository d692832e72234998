#!/usr/bin/env bash
# Create a Cloud TPU slice: a TPU VM, or with --queued a queued resource (waits until ACTIVE).
#
# usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [--runtime-version V]
#                  [--spot] [--queued] [--project P] [--no-wait] [--dry-run]
#   --accelerator-type  e.g. v6e-8, v5litepod-8, v5p-32 (gcloud's names)
#   --runtime-version   TPU VM software (default: the generation's, e.g. v2-alpha-tpuv6e)
#   --spot              spot capacity (cheaper, preemptible); default on-demand
#   --no-wait           do not wait for a queued resource to become ACTIVE

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage_from "$0"; exit 0; }
parse_common "$@"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
WAIT=1
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --accelerator-type) ACCELERATOR_TYPE="${2:?}"; shift 2 ;;
    --runtime-version) RUNTIME_VERSION="${2:?}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --on-demand) SPOT=0; shift ;;
    --no-wait) WAIT=0; shift ;;
    *) die "create.sh: unknown option $1" ;;
  esac
done
[[ -n "$ACCELERATOR_TYPE" ]] || die "set --accelerator-type (e.g. v6e-8)"
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}"
mapfile -t LOCATION < <(location_flags)
CAPACITY=()
if [[ "$SPOT" == 1 ]]; then CAPACITY=(--spot); fi

if [[ "$QUEUED" == 1 ]]; then
  run_gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME" \
    "${LOCATION[@]}" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--runtime-version=$RUNTIME_VERSION" "${CAPACITY[@]+"${CAPACITY[@]}"}"
  if [[ "$WAIT" == 1 && "$DRY_RUN" != 1 ]]; then
    log "waiting for queued resource $TPU_NAME to become ACTIVE"
    while true; do
      state="$(tpu_state)"
      case "$state" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state" ;;
        *) log "state: $state"; sleep "${POLL_SECONDS:-30}" ;;
      esac
    done
  fi
else
  run_gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
    "${CAPACITY[@]+"${CAPACITY[@]}"}"
fi
log "slice $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) created"
