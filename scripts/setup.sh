#!/usr/bin/env bash
# Install ldmflow into ./.venv (Python 3.11). With --test: also pytest and the emoji font the
# emoji tests need (Debian's fonts-noto-color-emoji, via apt when run as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "ldmflow needs Python 3.11, found " + sys.version' 
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extra=""
if [ "${1:-}" = "--test" ]; then
  extra="[test]"
  font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
  if [ ! -f "$font" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq fonts-noto-color-emoji >/dev/null
  fi
fi
.venv/bin/python -m pip install -q -e ".${extra}"
# DeepSpeed's CPU backend JIT-compiles an op when a training stage starts (36 s of the first
# quickstart on 2 cores): compile it now, into the workers' default cache.
.venv/bin/python -m cluster.prebuild 2>&1 | tail -1
echo "ldmflow installed in .venv ($(.venv/bin/python -c 'import torch, ray, deepspeed, mlflow; print("torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__, "mlflow", mlflow.__version__)' 2>/dev/null | tail -1))"
