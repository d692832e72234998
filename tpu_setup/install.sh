#!/usr/bin/env bash
# Install basque_jax on every worker of the slice, in a virtual environment
# ($HOME/basque-jax/venv), optionally mounting a GCS bucket with gcsfuse (read model folders
# from /mnt/gcs/BUCKET/...).
#
# (gcsfs and google-cloud-storage too: orbax and epath need them for gs:// outputs.)
#
# usage: install.sh --name NAME --zone ZONE [--source DIR | --pip SPEC] [--extras LIST]
#                   [--mount-bucket BUCKET] [--queued] [--project P] [--dry-run]
#   --source DIR          pack this checkout (tracked + untracked, not ignored, files) and
#                         install it (default: the repository holding tpu_setup/)
#   --pip SPEC            install SPEC with pip instead (e.g. "basque-jax[tpu,hub]==0.1.0" or
#                         "git+https://...@TAG#egg=basque-jax[tpu,hub]")
#   --extras LIST         extras for --source (default: tpu,hub)
#   --mount-bucket NAME   gcsfuse-mount gs://NAME at /mnt/gcs/NAME on every worker

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage_from "$0"; exit 0; }
parse_common "$@"
SOURCE="$(cd "$HERE/.." && pwd)"
PIP_SPEC=""
EXTRAS="tpu,hub"
BUCKET=""
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --source) SOURCE="${2:?}"; shift 2 ;;
    --pip) PIP_SPEC="${2:?}"; shift 2 ;;
    --extras) EXTRAS="${2:?}"; shift 2 ;;
    --mount-bucket) BUCKET="${2:?}"; shift 2 ;;
    *) die "install.sh: unknown option $1" ;;
  esac
done

REMOTE="$REMOTE_HOME_DIR"   # relative to the workers' home directory
PREPARE="set -euo pipefail; mkdir -p $REMOTE/run"
PREPARE+="; [ -x $REMOTE/venv/bin/pip ] || python3 -m venv $REMOTE/venv || { sudo apt-get update -qq"
PREPARE+=" && sudo apt-get install -y -qq python3-venv && python3 -m venv $REMOTE/venv; }"
PREPARE+="; $REMOTE/venv/bin/pip install -q --upgrade pip"
tpu_ssh all "$PREPARE"

if [[ -n "$PIP_SPEC" ]]; then
  tpu_ssh all "set -euo pipefail; $REMOTE/venv/bin/pip install -q $(quote_args "$PIP_SPEC") gcsfs google-cloud-storage"
else
  [[ -f "$SOURCE/pyproject.toml" ]] || die "--source $SOURCE: no pyproject.toml there"
  TARBALL="${TMPDIR:-/tmp}/basque_jax-src-$$.tar.gz"
  if [[ "$DRY_RUN" == 1 ]]; then
    log "would pack $SOURCE into $TARBALL"
  elif git -C "$SOURCE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SOURCE" && git ls-files -z --cached --others --exclude-standard \
      | tar --null --ignore-failed-read -czf "$TARBALL" -T -)
  else
    tar -czf "$TARBALL" -C "$SOURCE" --exclude=.venv --exclude=.git --exclude=runs .
  fi
  tpu_scp_all "$TARBALL" "$REMOTE/basque_jax-src.tar.gz"
  [[ "$DRY_RUN" == 1 ]] || rm -f "$TARBALL"
  INSTALL="set -euo pipefail; rm -rf $REMOTE/src && mkdir -p $REMOTE/src"
  INSTALL+="; tar -xzf $REMOTE/basque_jax-src.tar.gz -C $REMOTE/src"
  INSTALL+="; $REMOTE/venv/bin/pip install -q $(quote_args "./$REMOTE/src[$EXTRAS]") gcsfs google-cloud-storage"
  tpu_ssh all "$INSTALL"
fi

if [[ -n "$BUCKET" ]]; then
  MOUNT="set -euo pipefail; if ! command -v gcsfuse >/dev/null; then"
  MOUNT+=" echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  MOUNT+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
  MOUNT+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi"
  MOUNT+="; sudo mkdir -p /mnt/gcs/$BUCKET && sudo chown \"\$USER\" /mnt/gcs/$BUCKET"
  MOUNT+="; mountpoint -q /mnt/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/gcs/$BUCKET"
  tpu_ssh all "$MOUNT"
fi
tpu_ssh all "$REMOTE/venv/bin/basque-jax --help >/dev/null && $REMOTE/venv/bin/python -c 'import jax; print(jax.devices())'"
log "basque_jax installed on every worker of $TPU_NAME"
