#!/usr/bin/env bash
# Sets up this checkout on a fresh Debian/Ubuntu machine: system packages, then a virtual
# environment in .venv with torch, moshi and this package.  `setup.sh test` adds what the test
# suite needs.  Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

apt_packages=(espeak-ng libportaudio2)
if [ "$mode" = test ]; then
  apt_packages+=(sox chromium pulseaudio pulseaudio-utils libasound2-plugins)
fi
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip uv
# torch first: where pip is configured with a local CPU wheel (as on our CI machines) this takes
# it; elsewhere it is PyPI's build (CUDA on Linux x86-64).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null)
# moshi 0.2.13 declares torch<2.10 although it runs on newer torch: keep the torch we have.
# ray[serve] (the cluster command) asks for aiohttp>=3.14.4 and moshi pins <3.12: keep moshi's.
overrides=$(mktemp); printf 'torch==%s\naiohttp>=3.10.5,<3.12\n' "${torch_version}" > "$overrides"
extra="[cluster]"; [ "$mode" = test ] && extra="[test,cluster]"
.venv/bin/uv pip install -q --python .venv/bin/python --override "$overrides" -e ".${extra}"
rm -f "$overrides"
if [ "$mode" = test ]; then
  # pipecat and LiveKit Agents, the Realtime API's framework clients, in a virtualenv of their own
  # (tests/clients/requirements.txt says why); they need Python >= 3.11.
  if "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    [ -x .venv-clients/bin/python ] || "$python" -m venv .venv-clients
    .venv/bin/uv pip install -q --python .venv-clients/bin/python -r tests/clients/requirements.txt
  else
    echo "setup: Python < 3.11: the framework clients (.venv-clients) are not installed; their tests skip"
  fi
fi
echo "setup: ready (torch ${torch_version}); activate with: source .venv/bin/activate"
