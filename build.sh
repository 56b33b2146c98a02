#!/usr/bin/env bash
# ggc-ota build entry point. Each command installs what it needs on a fresh Debian/Ubuntu
# machine (run as root there), so a clean clone needs nothing else.
#
#   ./build.sh test [pytest args]   the test suite (real mosquitto, real HTTPS, real processes), then
#                                   the static binary and the frozen subset against it (SKIP_BINARY=1: not)
#   ./build.sh demo                 a whole update, end to end, against the local look-alike cloud
#   ./build.sh binary               dist/ggc-ota: a static binary for this machine's architecture
#   ./build.sh bench [--quick]      benchmarks against baselines measured in the same run
#   ./build.sh cloud DIR            start the look-alike cloud by hand (see README)
#   ./build.sh lint                 ruff and the Python 3.8 compatibility check of ggc_ota.py
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
VENV="$HERE/.venv"
DEBS=(mosquitto mosquitto-clients openssl ca-certificates busybox shellcheck systemd file)

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

need_root_for_apt() {
  if [ "$(id -u)" != 0 ]; then
    echo "build.sh: missing Debian packages ($*); run as root or install them" >&2
    exit 1
  fi
}

ensure_debs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root_for_apt "${missing[@]}"
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
  # Any CPython 3.8+ with venv works; prefer the one on PATH, fall back to Debian's.
  for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; assert sys.version_info >= (3, 8)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  ensure_debs python3
  echo /usr/bin/python3
}

ensure_venv() {
  local stamp="$VENV/.requirements.sha256" want
  want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  local py; py=$(pick_python)
  log "creating $VENV with $py"
  if ! "$py" -m venv --clear "$VENV" >/dev/null 2>&1; then
    ensure_debs python3-venv
    "$py" -m venv --clear "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > "$stamp"
}

cmd_test() {
  ensure_debs "${DEBS[@]}"
  ensure_venv
  log "running the test suite"
  local jobs="${PYTEST_JOBS:-2}"
  "$VENV/bin/python" -m pytest -n "$jobs" --dist loadfile "$@"
  if [ "${SKIP_BINARY:-0}" != 1 ]; then
    cmd_binary
    log "running the frozen subset against dist/ggc-ota"
    GGC_OTA_AGENT="$HERE/dist/ggc-ota" "$VENV/bin/python" -m pytest -n "$jobs" --dist loadfile -m frozen "$@"
  fi
}

cmd_lint() {
  ensure_venv
  "$VENV/bin/ruff" check .
  "$VENV/bin/vermin" -t=3.8- --no-tips --violations --eval-annotations ggc_ota.py
}

cmd_cloud() {
  ensure_debs "${DEBS[@]}"
  ensure_venv
  exec "$VENV/bin/python" -m tests.cloud "$@"
}

cmd_demo() {
  ensure_debs "${DEBS[@]}"
  ensure_venv
  exec "$VENV/bin/python" -m tests.demo "$@"
}

# Standard-library parts the agent never uses; leaving them out keeps the binary under 8 MB.
EXCLUDES=(tkinter unittest pydoc doctest lzma bz2 _lzma _bz2 _decimal decimal csv _csv sqlite3 xmlrpc pdb
  multiprocessing _codecs_jp _codecs_kr _codecs_cn _codecs_tw _codecs_hk _codecs_iso2022 _multibytecodec
  asyncio concurrent xml pyexpat _elementtree curses readline lib2to3 ensurepip venv idlelib zoneinfo)

cmd_bench() {
  ensure_debs "${DEBS[@]}" curl gzip tar
  ensure_venv
  [ -x dist/ggc-ota ] || cmd_binary
  exec "$VENV/bin/python" -m tests.bench "$@"
}

cmd_binary() {
  ensure_debs python3 python3-venv patchelf binutils
  local bvenv="$HERE/.venv-build" stamp want
  stamp="$bvenv/.requirements.sha256"
  want=$(sha256sum requirements-build.txt | cut -d' ' -f1)
  if [ ! -x "$bvenv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "creating $bvenv with Debian's python3"
    /usr/bin/python3 -m venv --clear "$bvenv"
    "$bvenv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-build.txt
    echo "$want" > "$stamp"
  fi
  local work="$HERE/build/binary" excl=()
  rm -rf "$work" && mkdir -p "$work" dist
  for m in "${EXCLUDES[@]}"; do excl+=(--exclude-module "$m"); done
  log "freezing ggc_ota.py with PyInstaller"
  "$bvenv/bin/pyinstaller" --onefile --strip --optimize 2 --noconfirm --log-level WARN --name ggc-ota-dynamic \
    --distpath "$work/dist" --workpath "$work/build" --specpath "$work" "${excl[@]}" ggc_ota.py
  log "making it static with staticx"
  "$bvenv/bin/staticx" --strip "$work/dist/ggc-ota-dynamic" dist/ggc-ota
  chmod 755 dist/ggc-ota
  dist/ggc-ota --version
  echo "dist/ggc-ota: $(stat -c %s dist/ggc-ota) bytes, $(uname -m), $(file -b dist/ggc-ota 2>/dev/null | cut -d, -f1-2)"
}

case "${1:-}" in
  test) shift; cmd_test "$@" ;;
  lint) shift; cmd_lint "$@" ;;
  cloud) shift; cmd_cloud "$@" ;;
  demo) shift; cmd_demo "$@" ;;
  binary) shift; cmd_binary "$@" ;;
  bench) shift; cmd_bench "$@" ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
