#!/usr/bin/env bash
# Stream a run's log ($HOME/basque-jax/run/train.log) from one worker (default 0) or all.
#
# usage: logs.sh --name NAME --zone ZONE [--worker N|all] [--lines N] [--no-follow]
#                [--queued] [--project P] [--dry-run]

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage_from "$0"; exit 0; }
parse_common "$@"
WORKER=0
LINES=100
FOLLOW=(-F)
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --worker) WORKER="${2:?}"; shift 2 ;;
    --lines) LINES="${2:?}"; shift 2 ;;
    --no-follow) FOLLOW=(); shift ;;
    *) die "logs.sh: unknown option $1" ;;
  esac
done
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker: a number or all"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines: a number"
tpu_ssh "$WORKER" "tail -n $LINES ${FOLLOW[*]+"${FOLLOW[*]}"} $REMOTE_HOME_DIR/run/train.log"
