#!/usr/bin/env bash
# Start the same `basque-jax train` on every worker, detached (it survives the ssh session),
# logging to $HOME/basque-jax/run/train.log; $HOME/basque-jax/run/EXIT holds its exit status
# (75: preempted after saving, resume it) and $HOME/basque-jax/run/DONE appears when it
# finishes. jax.distributed connects the workers by itself (BASQUE_JAX_DISTRIBUTED=auto); a
# run whose train.output_dir (gs://...) holds checkpoints resumes from the latest one.
#
# usage: launch.sh --name NAME --zone ZONE [--env KEY=VALUE]... [--restart] [--queued]
#                  [--project P] [--dry-run] REMOTE_CONFIG [key=value overrides...]
#   REMOTE_CONFIG  the path ship_config.sh printed (relative to the workers' home)
#   --env          extra environment for the run (e.g. HF_TOKEN=..., XLA flags)
#   --restart      stop a run still going on the workers first

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage_from "$0"; exit 0; }
parse_common "$@"
ENVS=(BASQUE_JAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1)
RESTART=0
ARGS=()
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --env) [[ "${2:?}" == *=* ]] || die "--env wants KEY=VALUE, got $2"; ENVS+=("$2"); shift 2 ;;
    --restart) RESTART=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
((${#ARGS[@]} >= 1)) || die "launch.sh: name the config (as ship_config.sh printed it)"

RUN="$REMOTE_HOME_DIR/run"
TRAIN="$(quote_args env "${ENVS[@]}" "$REMOTE_HOME_DIR/venv/bin/basque-jax" train "${ARGS[@]}")"
# EXIT is written last: whoever sees it also sees DONE
JOB="$TRAIN; code=\$?; if [ \$code = 0 ]; then touch $RUN/DONE; fi; echo \$code > $RUN/EXIT"
if [[ "$RESTART" == 1 ]]; then
  STOP="if [ -f $RUN/train.pid ]; then kill \$(cat $RUN/train.pid) 2>/dev/null || true; sleep 5; fi"
else
  STOP="if [ -f $RUN/train.pid ] && kill -0 \$(cat $RUN/train.pid) 2>/dev/null; then echo \"a run is still going on \$(hostname) (use --restart)\" >&2; exit 1; fi"
fi
COMMAND="set -euo pipefail; cd \"\$HOME\"; mkdir -p $RUN; $STOP; rm -f $RUN/DONE $RUN/EXIT"
COMMAND+="; nohup setsid bash -c $(printf '%q' "$JOB") >> $RUN/train.log 2>&1 < /dev/null &"
COMMAND+=" echo \$! > $RUN/train.pid; echo \"started on \$(hostname): pid \$(cat $RUN/train.pid)\""
tpu_ssh all "$COMMAND"
log "launched on every worker of $TPU_NAME; follow with: tpu_setup/logs.sh --name $TPU_NAME --zone $TPU_ZONE"
