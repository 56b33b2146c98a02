#!/usr/bin/env bash
# ggc-ota build entry point. Each command installs what it needs on a fresh Debian/Ubuntu
# machine (run as root there), so a clean clone needs nothing else.
#
#   ./build.sh test [pytest args]   the test suite (real mosquitto, real HTTPS, real processes), then
#                                   the static binary and the frozen subset against it (SKIP_BINARY=1: not)
#   ./build.sh demo                 a whole update, end to end, against the local look-alike cloud
#   ./build.sh binary               dist/ggc-ota: a static binary for this machine's architecture
#   ./build.sh binary --arch A      dist/ggc-ota-A for aarch64, armv7l or armv6l (Debian rootfs + qemu)
#   ./build.sh release [--arch A]   dist/: the binaries (this machine's, and each --arch), a .deb and an
#                                   .ipk of each, and SHA256SUMS of all
#   ./build.sh interpreter          only the binary's size-built Python (packaging/small_python.sh)
#   ./build.sh bench [--quick]      benchmarks against baselines measured in the same run
#   ./build.sh powercut [--quick]   the power-cut sweep: every cut point of every kind of update
#   ./build.sh powercut --mutants   the sweep against copies of the agent with a sync call removed
#   ./build.sh bench --fleet [N]    the fleet simulation: N agents (200) against one look-alike cloud
#   ./build.sh cloud DIR            start the look-alike cloud by hand (see README)
#   ./build.sh lint                 ruff and the Python 3.8 compatibility check of ggc_ota.py
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
VENV="$HERE/.venv"
# what packaging/small_python.sh needs, here and inside a cross build's rootfs
INTERPRETER_DEBS=(gcc make perl patch xz-utils libffi-dev zlib1g-dev libexpat1-dev liblzma-dev debian-archive-keyring)
DEBS=(mosquitto mosquitto-clients fuse3 openssl ca-certificates busybox shellcheck systemd file tinyproxy socat iproute2
  musl-tools liblzma-dev dpkg)

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
  local jobs="${PYTEST_JOBS:-2}" interpreter=""
  if [ "${SKIP_BINARY:-0}" != 1 ]; then
    # the binary's interpreter compiles while the suite runs, at the lowest priority: it takes
    # the CPU the suite leaves idle (the suite mostly waits on sockets and processes); in a
    # process group of its own (job control on while it starts), stopped whatever happens
    mkdir -p build
    set -m
    nice -n 19 ./build.sh interpreter > build/small_python.log 2>&1 &
    interpreter=$!
    set +m
    trap 'kill -- -'"$interpreter"' 2>/dev/null || true' EXIT
    log "compiling the binary's interpreter meanwhile (pid $interpreter, build/small_python.log)"
  fi
  log "running the test suite"
  "$VENV/bin/python" -m pytest -n "$jobs" --dist loadfile "$@"
  if [ -n "$interpreter" ]; then
    wait "$interpreter" || { tail -n 30 build/small_python.log >&2; exit 1; }
    trap - EXIT
    cmd_binary
    log "running the frozen subset against dist/ggc-ota"
    GGC_OTA_AGENT="$HERE/dist/ggc-ota" "$VENV/bin/python" -m pytest -n "$jobs" --dist loadfile -m frozen "$@"
  fi
}

cmd_lint() {
  ensure_debs shellcheck
  ensure_venv
  "$VENV/bin/ruff" check .
  "$VENV/bin/vermin" -t=3.8- --no-tips --violations --eval-annotations ggc_ota.py
  shellcheck build.sh .ci/run
  shellcheck -s sh openwrt/ggc-ota
}

cmd_cloud() {
  # ./build.sh cloud DIR: serve the look-alike with its files in DIR (until Ctrl-C); any other
  # form goes to its own command line (serve --workdir DIR ..., --workdir DIR <operation> ...).
  local args=("$@")
  if [ $# -eq 1 ] && [ "${1#-}" = "$1" ] && [ "$1" != serve ]; then
    mkdir -p "$1"
    args=(serve --workdir "$1")
  elif [ $# -eq 0 ]; then
    echo "usage: ./build.sh cloud DIR   (or: serve --workdir DIR | --workdir DIR <operation>; see tests/cloud/README.md)" >&2
    exit 2
  fi
  ensure_debs "${DEBS[@]}"
  ensure_venv
  exec "$VENV/bin/python" -m tests.cloud "${args[@]}"
}

cmd_demo() {
  ensure_debs "${DEBS[@]}"
  ensure_venv
  exec "$VENV/bin/python" -m tests.demo "$@"
}

# Standard-library parts the agent never uses; leaving them out keeps the binary under 8 MB and
# the extraction in TMPDIR (RAM on OpenWrt) small. inspect: its mere presence adds a PyInstaller
# runtime hook that imports it, ast, dis and zipfile at every start (2 MiB). The codecs: the CJK
# ones cannot work without their C modules; the DOS, EBCDIC and Mac code pages and the
# bytes-to-bytes codecs are no Linux locale's charset (the ISO-8859, KOI8, CP125x, TIS-620 and
# UTF codecs stay, so a device with any glibc locale still starts).
EXCLUDES=(tkinter unittest pydoc doctest lzma bz2 _lzma _bz2 _decimal decimal csv _csv sqlite3 xmlrpc pdb
  multiprocessing _codecs_jp _codecs_kr _codecs_cn _codecs_tw _codecs_hk _codecs_iso2022 _multibytecodec
  asyncio concurrent xml pyexpat _elementtree curses readline lib2to3 ensurepip venv idlelib zoneinfo
  inspect resource _pickle _statistics _md5 _sha1 _sha256 _sha3)
for codec in cp037 cp273 cp424 cp437 cp500 cp720 cp737 cp775 cp850 cp852 cp855 cp856 cp857 cp858 cp860 \
    cp861 cp862 cp863 cp864 cp865 cp866 cp869 cp874 cp875 cp1006 cp1026 cp1125 cp1140 mac_arabic mac_croatian \
    mac_cyrillic mac_farsi mac_greek mac_iceland mac_latin2 mac_roman mac_romanian mac_turkish hp_roman8 \
    palmos mbcs oem big5 big5hkscs cp932 cp949 cp950 euc_jis_2004 euc_jisx0213 euc_jp euc_kr gb18030 gb2312 \
    gbk hz iso2022_jp iso2022_jp_1 iso2022_jp_2 iso2022_jp_2004 iso2022_jp_3 iso2022_jp_ext iso2022_kr johab \
    shift_jis shift_jis_2004 shift_jisx0213 base64_codec bz2_codec hex_codec quopri_codec rot_13 uu_codec \
    zlib_codec; do
  EXCLUDES+=("encodings.$codec")
done

cmd_powercut() {
  # exit 0: every cut point held; 1: some failed (printed in full); 77: FUSE cannot run here (why)
  ensure_debs "${DEBS[@]}"
  ensure_venv
  "$VENV/bin/python" -m tests.powercut "$@"
}

cmd_bench() {
  ensure_debs "${DEBS[@]}" curl gzip tar
  ensure_venv
  [ -x dist/ggc-ota ] || cmd_binary
  exec "$VENV/bin/python" -m tests.bench "$@"
}

# The interpreter the binary is frozen with: CPython and OpenSSL from Debian's sources, built
# for size (packaging/small_python.sh says what and why), in .cache/python-<arch>. Prints its
# prefix; the caller sets LD_LIBRARY_PATH=<prefix>/lib (the build has no run-time path).
small_python() {
  ensure_debs "${INTERPRETER_DEBS[@]}" >&2
  local prefix mirror
  prefix="$HERE/.cache/python-$(uname -m)"
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
  # (called as $(small_python): errexit does not reach into a command substitution, so a failed
  # build must end it by hand, or its caller would go on with a broken interpreter)
  packaging/small_python.sh "$prefix" "${mirror:-http://deb.debian.org/debian}" >&2 || exit 1
  echo "$prefix"
}

cmd_binary() {
  if [ "${1:-}" = "--arch" ]; then
    cross_binary "${2:?--arch needs aarch64, armv7l or armv6l}"
    return
  fi
  ensure_debs binutils musl-tools liblzma-dev
  local py_prefix bvenv="$HERE/.venv-build" stamp want
  py_prefix=$(small_python)
  # that Python's libraries, for the build's commands only (the tests that follow must not see them)
  local with_lib=(env "LD_LIBRARY_PATH=$py_prefix/lib")
  stamp="$bvenv/.requirements.sha256"
  want=$(cat requirements-build.txt "$py_prefix/.ready" | sha256sum | cut -d' ' -f1)
  if [ ! -x "$bvenv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "creating $bvenv with the size-built Python in $py_prefix"
    "${with_lib[@]}" "$py_prefix/bin/python3.11" -m venv --clear "$bvenv"
    "${with_lib[@]}" "$bvenv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-build.txt
    echo "$want" > "$stamp"
  fi
  local work="$HERE/build/binary" excl=()
  rm -rf "$work" && mkdir -p "$work" dist
  for m in "${EXCLUDES[@]}"; do excl+=(--exclude-module "$m"); done
  log "freezing ggc_ota.py with PyInstaller, as one flat directory"
  "${with_lib[@]}" "$bvenv/bin/pyi-makespec" --onedir --contents-directory . --strip --optimize 2 \
    --name ggc-ota-dynamic --specpath "$work" "${excl[@]}" "$HERE/ggc_ota.py" > /dev/null
  "${with_lib[@]}" "$bvenv/bin/pyinstaller" --noconfirm --log-level WARN --distpath "$work/dist" \
    --workpath "$work/build" "$work/ggc-ota-dynamic.spec"
  log "the launcher (packaging/launcher.c: static, musl and liblzma)"
  build_launcher "$work/launcher"
  log "the binary: the launcher, then that directory and its C libraries as one xz stream (packaging/bundle.py)"
  "${with_lib[@]}" "$bvenv/bin/python" packaging/bundle.py "$work/dist/ggc-ota-dynamic" "$work/launcher" dist/ggc-ota
  rm -rf dist/.ggc-ota-*  # what a run of an earlier build from dist/ unpacked
  mkdir -p "$work/smoke" && cp dist/ggc-ota "$work/smoke/" && "$work/smoke/ggc-ota" --version
  echo "dist/ggc-ota: $(stat -c %s dist/ggc-ota) bytes, $(uname -m), $(file -b dist/ggc-ota 2>/dev/null | cut -d, -f1-2)"
}

# The launcher, static with musl: liblzma is Debian's static library (it calls nothing of glibc
# that musl lacks), its headers copied apart from glibc's. Here and inside a cross build's rootfs.
build_launcher() {
  local out=$1 lib inc
  lib=$(dpkg -L liblzma-dev | grep '/liblzma\.a$' | head -n 1)
  inc=$(mktemp -d)
  cp -r /usr/include/lzma.h /usr/include/lzma "$inc/"
  musl-gcc -static -Os -s -Wall -Wextra -Werror -Wno-format-truncation -I"$inc" -o "$out" \
    packaging/launcher.c "$lib"
  rm -rf "$inc"
}

# Cross builds: a Debian rootfs of the target architecture (debootstrap --foreign, cached in
# .cache/), run by qemu-user-static through binfmt_misc. The size-built Python is cross-compiled
# here with Debian's cross compiler against that rootfs (packaging/small_python.sh, into the
# rootfs's /opt/python; the native one is its build Python), then PyInstaller, the launcher
# (musl-gcc) and the bundle are made inside the rootfs under qemu, and the
# binary is smoke-run under qemu (armv6l with an ARMv6 CPU model) and runs the frozen core and
# crash tests there. About 20 minutes from nothing, 10 once the rootfs is cached. Not in CI.
cross_binary() {
  local arch=$1 debarch qemu qemu_cpu="" triple
  case "$arch" in
    aarch64) debarch=arm64; qemu="qemu-aarch64-static"; triple=aarch64-linux-gnu ;;
    armv7l) debarch=armhf; qemu="qemu-arm-static"; triple=arm-linux-gnueabihf ;;
    armv6l) debarch=armel; qemu="qemu-arm-static"; qemu_cpu=arm1176; triple=arm-linux-gnueabi ;;
    *) echo "build.sh: --arch takes aarch64, armv7l or armv6l" >&2; exit 2 ;;
  esac
  ensure_debs debootstrap qemu-user-static binfmt-support "gcc-$triple"
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  local fmt="${qemu%-static}"
  if [ ! -e "/proc/sys/fs/binfmt_misc/$fmt" ]; then
    update-binfmts --enable "$fmt" 2>/dev/null || update-binfmts --import "$fmt" 2>/dev/null || true
  fi
  [ -e "/proc/sys/fs/binfmt_misc/$fmt" ] || { echo "build.sh: cannot register $fmt with binfmt_misc" >&2; exit 1; }
  local rootfs="$HERE/.cache/rootfs-$debarch" mirror
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
  mirror=${mirror:-http://deb.debian.org/debian}
  if [ ! -f "$rootfs/.ready" ]; then
    log "making a Debian $debarch rootfs in $rootfs"
    rm -rf "$rootfs"
    debootstrap --foreign --arch="$debarch" --variant=minbase \
      --include=python3,python3-venv,python3-dev,gcc,libc6-dev,zlib1g-dev,binutils,musl-tools,file \
      bookworm "$rootfs" "$mirror"
    cp "/usr/bin/$qemu" "$rootfs/usr/bin/"
    chroot "$rootfs" /debootstrap/debootstrap --second-stage
    touch "$rootfs/.ready"
  fi
  rm -rf "$rootfs/build" && mkdir -p "$rootfs/build"
  mkdir -p "$rootfs/build/packaging"
  cp ggc_ota.py requirements-build.txt "$rootfs/build/"
  cp packaging/bundle.py packaging/launcher.c "$rootfs/build/packaging/"
  # pip inside the rootfs trusts what this machine trusts (a registry may sit behind a proxy
  # with its own CA) and reads its index settings
  mkdir -p "$rootfs/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/host-ca-certificates.crt"
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$rootfs/etc/pip.conf"
  local chroot_excludes=""
  for m in "${EXCLUDES[@]}"; do chroot_excludes="$chroot_excludes --exclude-module $m"; done
  # the interpreter's build packages, in the rootfs: the cross compiler builds against their headers
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh -ec "
      need='${INTERPRETER_DEBS[*]}'
      dpkg -s \$need >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \$need >/dev/null; }"
  local py_prefix
  py_prefix=$(small_python)
  log "cross-compiling the size-built Python for $arch ($triple-gcc, the rootfs as its sysroot)"
  env ${qemu_cpu:+QEMU_CPU=$qemu_cpu} CROSS="$triple" SYSROOT="$rootfs" BUILD_PYTHON="$py_prefix/bin/python3.11" \
    packaging/small_python.sh /opt/python "$mirror"
  log "building ggc-ota for $arch inside the rootfs (under qemu)"
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt \
    PIP_DEFAULT_TIMEOUT=180 \
    ${qemu_cpu:+QEMU_CPU=$qemu_cpu} /bin/sh -ec "
      cd /build
      export LD_LIBRARY_PATH=/opt/python/lib
      if [ \"\$(cat /venv/.python 2>/dev/null)\" != \"\$(cat /opt/python/.ready)\" ]; then
        rm -rf /venv && /opt/python/bin/python3.11 -m venv /venv && /venv/bin/pip install -q -r requirements-build.txt
        cp /opt/python/.ready /venv/.python
      fi
      /venv/bin/pyi-makespec --onedir --contents-directory . --strip --optimize 2 --name ggc-ota-dynamic $chroot_excludes ggc_ota.py >/dev/null
      /venv/bin/pyinstaller --noconfirm --log-level WARN ggc-ota-dynamic.spec
      lib=\$(dpkg -L liblzma-dev | grep '/liblzma\\.a\$' | head -n 1)
      mkdir -p inc && cp -r /usr/include/lzma.h /usr/include/lzma inc/
      musl-gcc -static -Os -s -Wall -Wextra -Werror -Wno-format-truncation -Iinc -o launcher packaging/launcher.c \$lib
      /venv/bin/python packaging/bundle.py dist/ggc-ota-dynamic launcher dist/ggc-ota"
  mkdir -p dist
  cp "$rootfs/build/dist/ggc-ota" "dist/ggc-ota-$arch"
  log "smoke run under qemu${qemu_cpu:+ (CPU $qemu_cpu)}: --version, and --dry-run on a sample root"
  ensure_venv
  local sample
  sample=$(mktemp -d)
  "$VENV/bin/python" - "$sample" <<'PY'
import sys
from pathlib import Path
from tests.cloud import Pki
from tests.cloud.device import make_root
work = Path(sys.argv[1])
pki = Pki(work / "pki")
make_root(work / "greengrass", "sample-core", pki.client("sample-core"), pki.ca_path, "localhost", 8883,
          ota_agent={"logFile": str(work / "agent.log")})
PY
  env ${qemu_cpu:+QEMU_CPU=$qemu_cpu} "$qemu" "dist/ggc-ota-$arch" --version
  env ${qemu_cpu:+QEMU_CPU=$qemu_cpu} "$qemu" "dist/ggc-ota-$arch" --root "$sample/greengrass" --dry-run
  rm -rf "$sample" "$sample/greengrass.lab"
  log "updates under qemu against the look-alike cloud: the frozen core and crash tests"
  ensure_debs "${DEBS[@]}"
  env ${qemu_cpu:+QEMU_CPU=$qemu_cpu} GGC_OTA_AGENT="$HERE/dist/ggc-ota-$arch" GGC_OTA_AGENT_ARCH="$arch" \
    "$VENV/bin/python" -m pytest -q -m frozen -n 2 tests/test_e2e_core.py tests/test_e2e_crash.py
  echo "dist/ggc-ota-$arch: $(stat -c %s "dist/ggc-ota-$arch") bytes, $(file -b "dist/ggc-ota-$arch" | cut -d, -f1-2)"
}

# A release: every binary built fresh (this machine's, then each --arch under qemu), packaged
# (packaging/make_package.py: .deb and .ipk), and SHA256SUMS of it all, in dist/.
cmd_release() {
  local machines=("$(uname -m)") version
  while [ $# -gt 0 ]; do
    case "$1" in
      --arch) machines+=("${2:?--arch needs aarch64, armv7l or armv6l}"); shift 2 ;;
      *) echo "build.sh: release takes --arch A (aarch64, armv7l, armv6l), not $1" >&2; exit 2 ;;
    esac
  done
  ensure_venv
  # the packages' file times: the release's commit (reproducible), unless given
  SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
  export SOURCE_DATE_EPOCH
  rm -f dist/ggc-ota-* dist/ggc-ota_* dist/SHA256SUMS
  cmd_binary
  cp dist/ggc-ota "dist/ggc-ota-${machines[0]}"
  for machine in "${machines[@]:1}"; do
    cross_binary "$machine"
  done
  version=$("$HERE/build/binary/smoke/ggc-ota" --version | cut -d' ' -f2)  # run where it unpacks nothing of dist/
  log "packaging ggc-ota $version for ${machines[*]}"
  "$VENV/bin/python" packaging/make_package.py release dist "$version" "${machines[@]}"
  (cd dist && sha256sum -c --quiet SHA256SUMS)
  log "dist/: verify with: sha256sum -c SHA256SUMS"
}

case "${1:-}" in
  test) shift; cmd_test "$@" ;;
  lint) shift; cmd_lint "$@" ;;
  cloud) shift; cmd_cloud "$@" ;;
  demo) shift; cmd_demo "$@" ;;
  binary) shift; cmd_binary "$@" ;;
  release) shift; cmd_release "$@" ;;
  interpreter) small_python ;;
  bench) shift; cmd_bench "$@" ;;
  powercut) shift; cmd_powercut "$@" ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
