# shellcheck shell=bash
# Shared by every tpu_setup script (sourced, never run): option parsing, the gcloud wrapper that
# --dry-run prints instead of running, and the TPU VM / queued-resource helpers.
#
# Common options (or environment variables):
#   --name NAME        TPU VM / queued resource name          ($TPU_NAME)
#   --zone ZONE        e.g. us-east5-b                         ($TPU_ZONE)
#   --project PROJECT  default: gcloud's configured project    ($TPU_PROJECT)
#   --queued           the slice is a queued resource (create.sh --queued made it)
#   --dry-run          print the gcloud commands instead of running them
# GCLOUD (default: gcloud) names the gcloud binary.

set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
QUEUED="${QUEUED:-0}"
DRY_RUN="${DRY_RUN:-0}"
GCLOUD="${GCLOUD:-gcloud}"
# Where things live on every worker.
REMOTE_HOME_DIR="${REMOTE_HOME_DIR:-basque-jax}"          # relative to the worker's $HOME
REMOTE_VENV="${REMOTE_VENV:-\$HOME/$REMOTE_HOME_DIR/venv}"
REMOTE_RUN_DIR="${REMOTE_RUN_DIR:-\$HOME/$REMOTE_HOME_DIR/run}"
REST=()

log() { printf '[tpu_setup] %s\n' "$*" >&2; }
die() { printf '[tpu_setup] error: %s\n' "$*" >&2; exit 2; }

# usage_from FILE: print the header comment of FILE (its leading # lines after the shebang).
usage_from() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"; }

# parse_common "$@": consume the common options; everything else lands in REST.
parse_common() {
  REST=()
  while (($#)); do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --name=*) TPU_NAME="${1#*=}"; shift ;;
      --zone) TPU_ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --zone=*) TPU_ZONE="${1#*=}"; shift ;;
      --project) TPU_PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --project=*) TPU_PROJECT="${1#*=}"; shift ;;
      --queued) QUEUED=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ -n "$TPU_NAME" ]] || die "set --name (or \$TPU_NAME)"
  [[ -n "$TPU_ZONE" ]] || die "set --zone (or \$TPU_ZONE)"
}

# Flags every gcloud call on the slice takes.
location_flags() {
  printf '%s\n' "--zone=$TPU_ZONE"
  if [[ -n "$TPU_PROJECT" ]]; then printf '%s\n' "--project=$TPU_PROJECT"; fi
}

# run_gcloud ARGS...: run gcloud, or print the command (shell-quoted) with --dry-run.
run_gcloud() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="gcloud" arg
    for arg in "$@"; do out+=" $(printf '%q' "$arg")"; done
    printf '%s\n' "$out"
    return 0
  fi
  "$GCLOUD" "$@"
}

# tpu_ssh WORKER COMMAND: run COMMAND (one shell string) on WORKER (a number or "all").
tpu_ssh() {
  local worker="$1" command="$2" flags
  mapfile -t flags < <(location_flags)
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--worker=$worker" \
    "--command=$command"
}

# tpu_scp_all SRC DEST [--recurse]: copy SRC to DEST (a worker path) on every worker.
tpu_scp_all() {
  local src="$1" dest="$2" flags extra=()
  mapfile -t flags < <(location_flags)
  if [[ "${3:-}" == "--recurse" ]]; then extra=(--recurse); fi
  run_gcloud compute tpus tpu-vm scp "${extra[@]}" "$src" "$TPU_NAME:$dest" "${flags[@]}" \
    --worker=all
}

# tpu_state: the slice's state (READY, PREEMPTED, ... for a TPU VM; ACTIVE, SUSPENDED, FAILED,
# ... for a queued resource), or NOT_FOUND.
tpu_state() {
  local flags state
  mapfile -t flags < <(location_flags)
  if [[ "$QUEUED" == 1 ]]; then
    state="$("$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${flags[@]}" \
      --format='value(state.state)' 2>/dev/null)" || state=NOT_FOUND
  else
    state="$("$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${flags[@]}" \
      --format='value(state)' 2>/dev/null)" || state=NOT_FOUND
  fi
  printf '%s\n' "${state:-NOT_FOUND}"
}

# default_runtime ACCELERATOR_TYPE: the TPU VM software version for that generation.
default_runtime() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# quote_args ARGS...: one shell-quoted string (for commands run on the workers).
quote_args() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(printf '%q' "$arg")"; done
  printf '%s' "$out"
}
