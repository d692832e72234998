#!/usr/bin/env bash
# Delete the slice (the TPU VM, or with --queued the queued resource and its VMs).
#
# usage: delete.sh --name NAME --zone ZONE [--queued] [--project P] [--dry-run]
# Checkpoints on gs:// stay; local files on the workers are lost.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage_from "$0"; exit 0; }
parse_common "$@"
((${#REST[@]} == 0)) || die "delete.sh: unknown option ${REST[0]}"
mapfile -t LOCATION < <(location_flags)
if [[ "$QUEUED" == 1 ]]; then
  run_gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
else
  run_gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
fi
log "slice $TPU_NAME deleted"
