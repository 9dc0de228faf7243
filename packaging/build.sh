#!/usr/bin/env bash
# Build the desktop app (PyInstaller, one folder) from a checkout:
#
#   bash packaging/build.sh                         # -> packaging/dist/opstudio/opstudio
#   OPSTUDIO_WEBENGINE=1 bash packaging/build.sh    # also bundle QtWebEngine (Netron in-app)
#
# Creates packaging/build/venv (reused on later runs), installs the project and PyInstaller into
# it, builds with packaging/opstudio.spec and prints the size of the result.
# Environment: PYTHON (interpreter for the venv, default python3, needs >= 3.10),
# OPSTUDIO_DIST (output folder, default packaging/dist). Extra arguments go to pyinstaller.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
VENV="$HERE/build/venv"
DIST="${OPSTUDIO_DIST:-$HERE/dist}"
mkdir -p "$DIST" && DIST="$(cd "$DIST" && pwd)"
WORK="$HERE/build/work"
if [ "${OPSTUDIO_WEBENGINE:-0}" = "1" ]; then WORK="$HERE/build/work-webengine"; fi

t0=$(date +%s)
step() { printf '\n== %s (%ds)\n' "$1" "$(( $(date +%s) - t0 ))"; }

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"error: opstudio needs Python >= 3.10, {sys.executable} is {sys.version.split()[0]}")
PY

if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

step "installing opstudio and PyInstaller into the build venv"
# From a fresh copy of the sources: setuptools builds inside the folder it is given (build/,
# *.egg-info), and a module deleted since an earlier build would linger in its build/lib.
SRC="$HERE/build/src"
rm -rf "$SRC"
mkdir -p "$SRC"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/app" "$ROOT/resources" "$SRC/"
find "$SRC" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip install --quiet "$SRC" "pyinstaller>=6.10,<7"
"$VENV/bin/python" -m pip list 2>/dev/null \
    | grep -iE '^(opstudio|pyinstaller|pyside6|onnxruntime|onnx|netron|numpy) ' || true

step "running PyInstaller"
"$VENV/bin/pyinstaller" --noconfirm --log-level WARN \
    --distpath "$DIST" --workpath "$WORK" "$@" "$HERE/opstudio.spec"

APP="$DIST/opstudio"
[ -x "$APP/opstudio" ] || { echo "error: $APP/opstudio was not produced" >&2; exit 1; }
# A Python built from source (pyenv, for one) leaves its debug symbols in libpython: ~17 MiB.
# Only those are removed; the wheels' own libraries are left as they were shipped.
if command -v strip >/dev/null; then
    find "$APP/_internal" -maxdepth 1 -type f -name 'libpython3*.so*' -exec strip --strip-debug {} +
fi
# What a desktop needs to list the app, laid out like /usr/share so that
# `cp -r share/. ~/.local/share/` installs it (see packaging/README.md).
install -Dm644 "$HERE/opstudio.desktop" "$APP/share/applications/opstudio.desktop"
install -Dm644 "$ROOT/resources/icons/opstudio.png" "$APP/share/icons/hicolor/256x256/apps/opstudio.png"
install -Dm644 "$ROOT/resources/icons/opstudio.svg" "$APP/share/icons/hicolor/scalable/apps/opstudio.svg"
step "done"
echo "executable: $APP/opstudio"
echo "size:       $(du -sh "$APP" | cut -f1) in $(find "$APP" -type f | wc -l) files" \
     "($(du -sm "$APP" | cut -f1) MiB)"
echo "build time: $(( $(date +%s) - t0 )) s"
