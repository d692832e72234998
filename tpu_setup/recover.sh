#!/usr/bin/env bash
# Keep a run alive through preemptions: check the slice every --interval seconds; when it is
# preempted, stopped, failed or gone, delete it, create it again, install, ship the config and
# launch the same command (the run resumes from the latest checkpoint in its gs:// output_dir).
# When the slice is up but the run died on a worker, relaunch it there (--restart). Stops when
# the run has finished (DONE on worker 0) or after --max-restarts recoveries.
#
# usage: recover.sh --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG.yaml
#                   [--spot] [--queued] [--runtime-version V] [--install-arg ARG]...
#                   [--env KEY=VALUE]... [--interval S] [--max-restarts N] [--once]
#                   [--project P] [--dry-run] [-- key=value overrides...]
#   --install-arg  passed on to install.sh (e.g. --install-arg --mount-bucket
#                  --install-arg my-bucket)
#   --once         one check (and at most one recovery), then exit
# With --dry-run the state is not queried: it prints the check and the full recovery.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage_from "$0"; exit 0; }
parse_common "$@"
ACCELERATOR_TYPE=""
CONFIG=""
CREATE_ARGS=()
INSTALL_ARGS=()
LAUNCH_ARGS=()
OVERRIDES=()
INTERVAL=300
MAX_RESTARTS=20
ONCE=0
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --accelerator-type) ACCELERATOR_TYPE="${2:?}"; shift 2 ;;
    --runtime-version) CREATE_ARGS+=(--runtime-version "${2:?}"); shift 2 ;;
    --spot) CREATE_ARGS+=(--spot); shift ;;
    --config) CONFIG="${2:?}"; shift 2 ;;
    --install-arg) INSTALL_ARGS+=("${2:?}"); shift 2 ;;
    --env) LAUNCH_ARGS+=(--env "${2:?}"); shift 2 ;;
    --interval) INTERVAL="${2:?}"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="${2:?}"; shift 2 ;;
    --once) ONCE=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "recover.sh: unknown option $1" ;;
  esac
done
[[ -n "$ACCELERATOR_TYPE" ]] || die "set --accelerator-type"
[[ -n "$CONFIG" ]] || die "set --config (the local YAML; it is shipped again after recreation)"

COMMON=(--name "$TPU_NAME" --zone "$TPU_ZONE")
if [[ -n "$TPU_PROJECT" ]]; then COMMON+=(--project "$TPU_PROJECT"); fi
if [[ "$QUEUED" == 1 ]]; then COMMON+=(--queued); fi
if [[ "$DRY_RUN" == 1 ]]; then COMMON+=(--dry-run); fi
RUN="$REMOTE_HOME_DIR/run"

# job_status: DONE, RUNNING, FAILED (a worker's run exited with an error other than 75, the
# preemption status: a config error, a divergence -- relaunching would not help) or STOPPED
# (the run is gone on at least one worker, or was preempted: relaunch to resume).
job_status() {
  local flags out
  mapfile -t flags < <(location_flags)
  out="$("$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker=all \
    "--command=if [ -f $RUN/DONE ]; then echo DONE; elif [ -f $RUN/train.pid ] && kill -0 \$(cat $RUN/train.pid) 2>/dev/null; then echo RUNNING; elif [ -f $RUN/EXIT ] && [ \"\$(cat $RUN/EXIT)\" != 75 ]; then echo FAILED; else echo STOPPED; fi" \
    2>/dev/null)" || { echo STOPPED; return; }
  if grep -q FAILED <<<"$out"; then echo FAILED
  elif grep -q STOPPED <<<"$out"; then echo STOPPED
  elif grep -q RUNNING <<<"$out"; then echo RUNNING
  elif grep -q DONE <<<"$out"; then echo DONE
  else echo STOPPED; fi
}

launch() {
  local shipped remote
  shipped="$("$HERE/ship_config.sh" "${COMMON[@]}" "$CONFIG")"
  remote="$(tail -n 1 <<<"$shipped")"
  if [[ "$DRY_RUN" == 1 ]]; then sed '$d' <<<"$shipped"; fi
  "$HERE/launch.sh" "${COMMON[@]}" "${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"}" "$@" "$remote" \
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
}

recreate() {
  log "recreating $TPU_NAME"
  "$HERE/delete.sh" "${COMMON[@]}" || true
  "$HERE/create.sh" "${COMMON[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
    "${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}"
  "$HERE/install.sh" "${COMMON[@]}" "${INSTALL_ARGS[@]+"${INSTALL_ARGS[@]}"}"
  launch
}

restarts=0
while true; do
  if [[ "$DRY_RUN" == 1 ]]; then
    mapfile -t LOCATION < <(location_flags)
    if [[ "$QUEUED" == 1 ]]; then
      run_gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}" \
        "--format=value(state.state)"
    else
      run_gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" "--format=value(state)"
    fi
    state=PREEMPTED
  else
    state="$(tpu_state)"
  fi
  log "slice $TPU_NAME: $state"
  case "$state" in
    READY | ACTIVE)
      job="$(job_status)"
      log "run: $job"
      case "$job" in
        DONE) log "the run has finished"; exit 0 ;;
        FAILED) die "the run exited with an error on a worker (see tpu_setup/logs.sh); not relaunching" ;;
        STOPPED)
          ((restarts < MAX_RESTARTS)) || die "gave up after $restarts recoveries"
          restarts=$((restarts + 1))
          launch --restart ;;
      esac ;;
    PREEMPTED | TERMINATED | STOPPED | STOPPING | SUSPENDED | SUSPENDING | FAILED | NOT_FOUND)
      ((restarts < MAX_RESTARTS)) || die "gave up after $restarts recoveries"
      restarts=$((restarts + 1))
      recreate ;;
    *) ;;  # CREATING, PROVISIONING, WAITING_FOR_RESOURCES, REPAIRING, ...: wait
  esac
  [[ "$ONCE" == 1 ]] && exit 0
  sleep "$INTERVAL"
done
