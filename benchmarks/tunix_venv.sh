#!/usr/bin/env bash
# Creates .venv-tunix: Tunix (google-tunix, LoRA through qwix) for the JAX peer of the CPU
# benchmarks (benchmarks/tunix_peer.py). Its own environment because Tunix pins
# safetensors<0.8 while the project pins 0.8.0. jax / flax are pinned to the project's
# versions so both sides run the same XLA; everything else is pinned to the set that was tested
# (benchmarks/tunix_constraints.txt, a pip freeze). Idempotent; PYTHON=python3.x picks the
# interpreter (Tunix needs Python >= 3.11).
#
#   bash benchmarks/tunix_venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv-tunix
PINS=(google-tunix==0.1.7 qwix==0.1.8 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8
      safetensors==0.7.0 numpy==2.4.6)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -c benchmarks/tunix_constraints.txt "${PINS[@]}"
"$VENV/bin/python" -c "import tunix, qwix, jax, flax; print('tunix venv ready: jax', \
jax.__version__, 'flax', flax.__version__)"
