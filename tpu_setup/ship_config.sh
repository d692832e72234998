#!/usr/bin/env bash
# Copy a run config, with every file its base: chain can reach, to all workers. The config's
# root folder (the enclosing configs/ folder, else the config's own folder; or --root) is
# copied whole to $HOME/basque-jax/<root name>/; prints the config's path there (relative to
# the workers' home) for launch.sh.
#
# usage: ship_config.sh --name NAME --zone ZONE CONFIG.yaml [--root DIR] [--queued]
#                       [--project P] [--dry-run]

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage_from "$0"; exit 0; }
parse_common "$@"
CONFIG=""
ROOT=""
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --root) ROOT="${2:?}"; shift 2 ;;
    -*) die "ship_config.sh: unknown option $1" ;;
    *) [[ -z "$CONFIG" ]] || die "ship_config.sh: one config at a time"; CONFIG="$1"; shift ;;
  esac
done
[[ -n "$CONFIG" ]] || die "ship_config.sh: name the config to ship"
[[ -f "$CONFIG" ]] || die "config $CONFIG not found"
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
if [[ -z "$ROOT" ]]; then
  if [[ "$CONFIG" == */configs/* ]]; then
    ROOT="${CONFIG%%/configs/*}/configs"
  else
    ROOT="$(dirname "$CONFIG")"
  fi
fi
ROOT="$(cd "$ROOT" && pwd)"
[[ "$CONFIG" == "$ROOT"/* ]] || die "config $CONFIG is not inside --root $ROOT"
NAME="$(basename "$ROOT")"
REMOTE="$REMOTE_HOME_DIR"
tpu_ssh all "mkdir -p $REMOTE && rm -rf $(quote_args "$REMOTE/$NAME")"
tpu_scp_all "$ROOT" "$REMOTE/" --recurse
printf '%s\n' "$REMOTE/$NAME/${CONFIG#"$ROOT"/}"
