#!/usr/bin/env bash
# Smoke test of the desktop build: runs the built program the way a user would, offscreen.
#
#   bash packaging/smoke_test.sh [PATH/TO/opstudio]    # default: packaging/dist/opstudio/opstudio
#
# Checks --version against pyproject, the CLI (inspect, profile and optimize, which run models in
# child processes started by the frozen executable), Netron's bundled web files, and the app:
# it starts offscreen on a demo model, profiles it, saves a screenshot and quits with exit code 0
# (and, driven from a script, its profile must produce a result).
# Prints the time of each check; exits 1 if any failed.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
APP="${1:-$HERE/dist/opstudio/opstudio}"
[ -d "$APP" ] && APP="$APP/opstudio"
if [ ! -x "$APP" ]; then
    echo "error: no executable at $APP (run packaging/build.sh first)" >&2
    exit 1
fi
APP="$(cd "$(dirname "$APP")" && pwd)/$(basename "$APP")"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/opstudio-smoke.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
# The built program must not lean on the build machine's Python.
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
export QT_QPA_PLATFORM=offscreen

VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n1)"
CNN="$ROOT/resources/article_cnn.onnx"
LLM="$ROOT/resources/tiny_llm.onnx"
failed=0
passed=0
t_all=$(date +%s.%N)

# check NAME SECONDS CONDITION -- COMMAND...: runs COMMAND (output in $OUT/NAME.log) with a time
# limit, then evaluates CONDITION (a shell snippet; $code is the exit code, $log the output file).
check() {
    local name="$1" limit="$2" cond="$3"
    shift 4
    local log="$OUT/$name.log" t0 t1 code
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    code=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then
        printf 'FAIL  %-10s %6ss  timed out after %ss\n' "$name" "$secs" "$limit"
    elif code=$code log=$log bash -c "$cond"; then
        printf 'ok    %-10s %6ss\n' "$name" "$secs"
        passed=$((passed + 1))
        return 0
    else
        printf 'FAIL  %-10s %6ss  exit code %s\n' "$name" "$secs" "$code"
    fi
    sed 's/^/      | /' "$log" | tail -n 25
    failed=$((failed + 1))
    return 1
}

echo "smoke test of $APP (expecting version $VERSION)"

check version 30 '[ $code = 0 ] && grep -qx "opstudio '"$VERSION"'" $log' -- \
    "$APP" --version

check help 30 '[ $code = 0 ] && for c in gui demo inspect profile optimize compare advise; do
                   grep -qw $c $log || { echo "missing command $c"; exit 1; }; done' -- \
    "$APP" --help

# Demo models and icons must come from inside the build, not from a checkout next to it.
RESOURCES_CHECK='
import sys
from pathlib import Path
from opstudio.resources import demo_model_path, resource_path
inside = Path(sys._MEIPASS).resolve()
paths = [demo_model_path("article_cnn"), demo_model_path("tiny_llm"),
         resource_path("icons/opstudio.png"), resource_path("icons/opstudio.svg")]
for p in paths:
    print(p)
sys.exit(0 if all(p is not None and inside in p.resolve().parents for p in paths) else 1)
'
check resources 30 '[ $code = 0 ]' -- "$APP" -c "$RESOURCES_CHECK"

check inspect 60 '[ $code = 0 ] && grep -q MatMul $log' -- \
    "$APP" inspect "$LLM"

# Runs the model in a forkserver child of the frozen executable.
check profile 120 '[ $code = 0 ] && grep -q "total (profiled" $log && grep -q "\"conv1\"" '"$OUT/profile.json" -- \
    "$APP" profile "$CNN" --runs 3 --json "$OUT/profile.json"
[ -s "$OUT/profile.log" ] && sed -n '1,8p' "$OUT/profile.log" | sed 's/^/      | /'

# Every technique once: onnxruntime.quantization (INT8, INT4 with onnx_ir/ml_dtypes),
# onnxruntime.transformers.float16 and the numpy passes, then the accuracy check in a child.
cat >"$OUT/recipe.json" <<'JSON'
{"version": 1, "steps": [
  {"nodes": ["lm_head"], "technique": "int4-weight", "params": {"block_size": 32}},
  {"nodes": ["block0.mlp.fc1"], "technique": "int8-dynamic", "params": {}},
  {"nodes": ["block1.mlp.fc1"], "technique": "fp16", "params": {}},
  {"nodes": ["block1.mlp.fc2"], "technique": "lowrank", "params": {"rank": 16}}
]}
JSON
check optimize 300 '[ $code = 0 ] && [ -s '"$OUT/optimized.onnx"' ] && grep -q cosine $log' -- \
    "$APP" optimize "$LLM" --recipe "$OUT/recipe.json" -o "$OUT/optimized.onnx"

# The Netron view starts `<executable> -c <server code> MODEL`; serve the model on loopback the
# same way and fetch Netron's page, which must come from the bundled static files.
NETRON_CHECK='
import sys, urllib.request
import netron
host, port = netron.serve(sys.argv[1], address=("127.0.0.1", 0), browse=False)
page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20).read()
netron.stop()
print(f"served {len(page)} bytes")
sys.exit(0 if b"<html" in page.lower() else 1)
'
check netron 60 '[ $code = 0 ] && grep -q "served" $log' -- \
    "$APP" -c "$NETRON_CHECK" "$CNN"

# With QtWebEngine in the build (OPSTUDIO_WEBENGINE=1), Netron must also show inside the app.
if "$APP" -c "import PySide6.QtWebEngineWidgets" >/dev/null 2>&1; then
    NETRON_VIEW_CHECK='
import sys
from PySide6.QtCore import QTimer
from opstudio.qt.app import create_app
from opstudio.qt.netron_view import NetronWindow
app = create_app()
win = NetronWindow(sys.argv[1])
win.show()
state = {"loaded": None}
def finish():
    win.grab().save(sys.argv[2])
    win.close()
    app.quit()
def loaded(ok):
    state["loaded"] = ok
    QTimer.singleShot(3000, finish)  # time for Netron to lay out and draw the graph
def ready(url):
    print("netron at", url, flush=True)
    win.web.loadFinished.connect(loaded)
win.server.ready.connect(ready)
win.server.failed.connect(lambda message: (print("failed:", message), app.exit(1)))
QTimer.singleShot(90000, lambda: app.exit(2))
code = app.exec()
print("page loaded:", state["loaded"])
sys.exit(code or (0 if state["loaded"] else 1))
'
    check webview 120 '[ $code = 0 ] && [ -s '"$OUT/netron.png"' ]' -- \
        "$APP" -c "$NETRON_VIEW_CHECK" "$CNN" "$OUT/netron.png"
    if [ -s "$OUT/netron.png" ] && [ -n "${OPSTUDIO_SMOKE_SCREENSHOT:-}" ]; then
        cp "$OUT/netron.png" "${OPSTUDIO_SMOKE_SCREENSHOT%.png}-netron.png"
    fi
else
    echo "skip  webview    (built without QtWebEngine: Netron opens in the system browser)"
fi

# The app as a user starts it: opens the bundled demo model, profiles it, saves a screenshot
# and quits by itself (--quit-after is the upper bound), exit code 0.
check gui 120 '[ $code = 0 ] && [ -s '"$OUT/gui.png"' ]' -- \
    "$APP" demo --model article_cnn --profile --quit-after 30 --screenshot "$OUT/gui.png"
if [ -s "$OUT/gui.png" ] && [ -n "${OPSTUDIO_SMOKE_SCREENSHOT:-}" ]; then
    cp "$OUT/gui.png" "$OPSTUDIO_SMOKE_SCREENSHOT"
    echo "      screenshot: $OPSTUDIO_SMOKE_SCREENSHOT"
fi

# The app's exit code does not say whether its profile worked, so drive the same window and
# check: the worker thread starts the child process from inside the running Qt app.
GUI_PROFILE_CHECK='
import sys
from PySide6.QtCore import QTimer
from opstudio.qt.app import create_app
from opstudio.qt.main_window import MainWindow
from opstudio.resources import demo_model_path
app = create_app()
win = MainWindow()
win.show()
seen = {"result": None, "error": None}
if not win.open_model(demo_model_path("tiny_llm")):
    sys.exit("the demo model did not open")
worker = win.run_profile()
if worker is None:
    sys.exit("the profile did not start")
worker.signals.result.connect(lambda r: seen.__setitem__("result", r))
worker.signals.error.connect(lambda m: seen.__setitem__("error", m))
worker.signals.finished.connect(lambda: QTimer.singleShot(200, app.quit))
QTimer.singleShot(90000, lambda: app.exit(2))
code = app.exec()
win.close()
nodes = len(win.profile.nodes) if win.profile is not None else 0
print("error: " + seen["error"] if seen["error"] else f"profiled {nodes} operators")
sys.exit(code or (0 if seen["result"] is not None and nodes > 0 else 1))
'
check guiprofile 120 '[ $code = 0 ] && grep -q "profiled" $log' -- \
    "$APP" -c "$GUI_PROFILE_CHECK"

# Nothing the program started (forkserver, resource tracker, Netron) may outlive it.
sleep 1
left="$(pgrep -af -- "$(dirname "$APP")/" | grep -v -e pgrep -e smoke_test || true)"
if [ -n "$left" ]; then
    echo "FAIL  leftovers  processes still running:"
    echo "$left" | sed 's/^/      | /'
    failed=$((failed + 1))
else
    echo "ok    leftovers  none"
    passed=$((passed + 1))
fi

total=$(awk -v a="$t_all" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "smoke: $passed passed, $failed failed in ${total} s"
[ "$failed" = 0 ]
