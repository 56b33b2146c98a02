#!/bin/sh
# The interpreter the static binary is frozen with: CPython and OpenSSL built for size, from
# Debian's own sources (the stable release's current versions, with all of Debian's patches,
# security fixes included), into PREFIX.
#
#   packaging/small_python.sh PREFIX [MIRROR]
#   CROSS=TRIPLE SYSROOT=ROOTFS BUILD_PYTHON=PYTHON packaging/small_python.sh PREFIX [MIRROR]
#
# The second form cross-compiles, on this machine, for the Debian rootfs ROOTFS of another
# architecture: Debian's cross compiler TRIPLE-gcc (e.g. arm-linux-gnueabihf) with --sysroot=ROOTFS,
# so that it builds against the rootfs's own libc, zlib, libffi, expat and liblzma, and installs
# into ROOTFS/PREFIX, where the interpreter runs inside the rootfs. CPython's cross build runs
# BUILD_PYTHON, a CPython of the same version that runs here, its libraries in ../lib (as in
# this script's own native build). The rootfs must have the build packages named below. This is
# what makes a cross build take minutes: compiling inside the rootfs under qemu-user took about
# 50 minutes per stage and architecture. Sources, logs and stamps go to ROOTFS/PREFIX.src.
#
# Why not Debian's python3: a onefile binary unpacks its libraries into TMPDIR, which is RAM
# on OpenWrt, and every byte of them counts whether the agent uses it or not. Debian builds
# libpython for speed with fifty modules inside (7.4 MiB) and OpenSSL with every algorithm
# (libcrypto 4.5 MiB). Here:
#   - OpenSSL 3.0 without the ciphers, digests and protocols TLS 1.2/1.3 to AWS IoT and S3
#     never uses (no legacy provider, SSLv3, DTLS, IDEA, Camellia, SEED, Blowfish, CAST, RC2/4/5,
#     MD4, MDC2, Whirlpool, RIPEMD, SM2/3/4, ARIA, GOST, CMS, TS, OCSP, CT, SRP, DSA, binary
#     curves, engines), -Os, assembler kept (AES-NI, SHA extensions). Its directory is Debian's
#     /usr/lib/ssl, so the system's CAs are found where Debian and Ubuntu keep them, as with
#     Debian's own build; it never reads the device's openssl.cnf (no-autoload-config);
#   - CPython -Os without docstrings, its extension modules built into libpython as
#     packaging/Setup.local lists them.
# Both are plain builds with no run-time path (staticx refuses DT_RUNPATH): callers set
# LD_LIBRARY_PATH=PREFIX/lib. Sources are fetched with apt-get source (verified against
# Debian's signed index) into PREFIX.src. PREFIX/.ready holds the versions built; a second run
# with the same script, Setup.local and versions does nothing, and a run that was stopped
# resumes at the stage it stopped in (OpenSSL built, CPython configured: its make goes on);
# OpenSSL's stage is keyed by its own options and version only, so a change to the CPython half
# keeps it. Needs gcc, make, perl, patch, and the zlib, libffi, expat and liblzma headers (lzma
# is for the build: staticx compresses with it; the agent never imports it, so the freeze leaves
# it out). About 4 minutes on two x86_64 cores, natively or cross.
set -eu
prefix=$1
mirror=${2:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)
cross=${CROSS:-}
dest=""  # where PREFIX is on this machine: inside the rootfs for a cross build
if [ -n "$cross" ]; then
  dest=${SYSROOT:?small_python: a cross build needs SYSROOT, the target rootfs}
  : "${BUILD_PYTHON:?small_python: a cross build needs BUILD_PYTHON, a CPython 3.11 that runs here}"
  cross_cc="$cross-gcc --sysroot=$dest"
fi
src="$dest$prefix.src"
jobs=$(nproc 2>/dev/null || echo 2)

recipe=$(cat "$0" "$here/Setup.local" | sha256sum | cut -d' ' -f1)

# -- sources: Debian's stable release, through apt with a private state (no root needed) -----
mkdir -p "$src/apt/lists/partial" "$src/apt/cache/archives/partial" "$src/dl"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
{
  echo "deb-src [signed-by=$keyring] $mirror bookworm main"
  echo "deb-src [signed-by=$keyring] $mirror bookworm-updates main"
} > "$src/apt/sources.list"
apt_opts="-o Dir::Etc::SourceList=$src/apt/sources.list -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists=$src/apt/lists -o Dir::Cache=$src/apt/cache -o Debug::NoLocking=1
  -o APT::Sandbox::User=root -qq"
# shellcheck disable=SC2086
apt-get $apt_opts update
# shellcheck disable=SC2086
versions=$(apt-get $apt_opts source --print-uris python3.11 openssl | grep -o "[^/']*\.dsc'" | tr -d "'" | tr '\n' ' ')
want="$recipe ${cross:-native} $versions"
if [ -f "$dest$prefix/.ready" ] && [ "$(cat "$dest$prefix/.ready")" = "$want" ]; then
  exit 0
fi
echo "small_python: building $versions into $dest$prefix${cross:+ (cross, for $cross)}" >&2
cd "$src/dl"
rm -rf ./*
# shellcheck disable=SC2086
apt-get $apt_opts source --download-only python3.11 openssl

# run a build step with its output in a log; on failure, say which step and show the log's end
logged() {  # $1: log file, then the command
  log=$1
  shift
  if ! "$@" >> "$log" 2>&1; then
    echo "small_python: failed: $*; the end of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
}

# unpack an upstream tarball and apply Debian's patch series to it
unpack() {  # $1: source package, $2: directory name
  rm -rf "${src:?}/${2:?}"
  mkdir -p "$src/$2"
  tar -xzf "$src"/dl/"$1"_*.orig.tar.gz -C "$src/$2" --strip-components=1
  tar -xJf "$src"/dl/"$1"_*.debian.tar.xz -C "$src/$2"
  (cd "$src/$2" && sed -e 's/#.*//' -e '/^[[:space:]]*$/d' debian/patches/series | while read -r patch; do
    patch -p1 -s --forward < "debian/patches/$patch"
  done)
}

# a stage already done by a run of this same recipe on these same versions
stage_done() {  # $1: the stage's stamp file, $2: what it must hold
  [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]
}

# -- OpenSSL ------------------------------------------------------------------------------------
# The target is named, not guessed by ./config: on armv7l, ./config adds -march=armv7-a, which
# drops the FPU Debian's armhf compiler assumes, and the hard-float build fails.
machine=${cross:-$(uname -m)}
case "$machine" in
  x86_64*) target=linux-x86_64 ;;
  aarch64*) target=linux-aarch64 ;;
  arm*) target=linux-armv4 ;;  # OpenSSL's name for every 32-bit ARM; the compiler's defaults decide
  *) echo "small_python: no OpenSSL target known for $machine" >&2; exit 1 ;;
esac
options="--prefix=$prefix --libdir=lib --openssldir=/usr/lib/ssl -Os
  shared no-tests no-legacy no-engine no-ssl3 no-dtls no-sctp no-srtp no-idea no-camellia no-seed
  no-bf no-cast no-rc2 no-rc4 no-rc5 no-md4 no-mdc2 no-whirlpool no-rmd160 no-sm2 no-sm3 no-sm4
  no-aria no-siphash no-gost no-cms no-ts no-ocsp no-ct no-cmp no-ui-console no-srp no-ec2m no-dsa
  no-autoload-config no-nextprotoneg no-async no-uplink"
openssl_want="$target $(echo "$options" | sha256sum | cut -d' ' -f1) $(echo "$versions" | tr ' ' '\n' | grep '^openssl_')"
if ! stage_done "$dest$prefix/.openssl" "$openssl_want"; then
  rm -rf "$dest$prefix"
  unpack openssl openssl
  cd "$src/openssl"
  : > "$src/openssl.log"
  set --
  [ -z "$cross" ] || set -- CC="$cross_cc" AR="$cross-ar" RANLIB="$cross-ranlib"
  # shellcheck disable=SC2086
  logged "$src/openssl.log" ./Configure "$target" $options "$@"
  logged "$src/openssl.log" make -j"$jobs" build_libs
  logged "$src/openssl.log" make install_sw DESTDIR="$dest"
  rm -rf "$dest$prefix/lib/engines-3" "$dest$prefix/lib/ossl-modules" "$dest$prefix/lib/"*.a
  echo "$openssl_want" > "$dest$prefix/.openssl"
fi

# -- CPython ------------------------------------------------------------------------------------
if [ -n "$cross" ]; then
  # The rootfs's development links are absolute (libm.so -> /lib/<triple>/libm.so.6): from here
  # they point at this machine's files, and the linker, finding none, takes the static libm.a
  # instead. Relative, they mean the same inside the rootfs and lead into it from here.
  find "$dest/usr/lib" -maxdepth 2 -type l -lname '/*' | while read -r link; do
    ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$dest$(readlink "$link")")" "$link"
  done
  # configure's questions it cannot answer by running a test program, and pkg-config looking
  # in the rootfs, not at this machine's libraries
  printf 'ac_cv_file__dev_ptmx=yes\nac_cv_file__dev_ptc=no\nac_cv_buggy_getaddrinfo=no\n' > "$src/config.site"
  export CONFIG_SITE="$src/config.site" PKG_CONFIG_SYSROOT_DIR="$dest"
  export PKG_CONFIG_LIBDIR="$dest/usr/lib/$cross/pkgconfig:$dest/usr/lib/pkgconfig:$dest/usr/share/pkgconfig"
  set -- --host="$cross" --build="$(gcc -dumpmachine)" --with-build-python="$BUILD_PYTHON" CC="$cross_cc"
  LD_LIBRARY_PATH="$(cd "$(dirname "$BUILD_PYTHON")/.." && pwd)/lib"  # BUILD_PYTHON's own
  export LD_LIBRARY_PATH
else
  export LD_LIBRARY_PATH="$prefix/lib"
  set --
fi
if ! stage_done "$src/python/.configured" "$want"; then
  unpack python3.11 python
  cd "$src/python"
  cp "$here/Setup.local" Modules/Setup.local
  : > "$src/python.log"
  logged "$src/python.log" ./configure --prefix="$prefix" --enable-shared --with-openssl="$dest$prefix" \
    --without-doc-strings --disable-test-modules --without-ensurepip --with-computed-gotos --with-system-expat \
    --with-ssl-default-suites=openssl OPT="-DNDEBUG -fwrapv -Os" "$@"
  echo "$want" > "$src/python/.configured"
fi
cd "$src/python"
logged "$src/python.log" make -j"$jobs"
if [ -n "$cross" ]; then
  # Debian's `make install` takes the build's sysconfig data by Debian's name for it
  # (_sysconfigdata__<triple>.py); a cross build writes it under upstream's (..._linux_<triple>)
  (cd "$(cat pybuilddir.txt)" && for f in _sysconfigdata__linux_*.py; do cp "$f" "_sysconfigdata__${f#_sysconfigdata__linux_}"; done)
fi
# an earlier CPython in PREFIX (OpenSSL's stage kept, the CPython half changed, or an install
# stopped half-way) makes `make install` fail: it links without -f
rm -rf "$dest$prefix/lib/python3.11" "$dest$prefix/include/python3.11" "$dest$prefix/lib/pkgconfig/python"* \
  "$dest$prefix/lib/libpython3"* "$dest$prefix/bin/python3"* "$dest$prefix/bin/pydoc3"* "$dest$prefix/bin/idle3"* \
  "$dest$prefix/bin/2to3"*
logged "$src/python.log" make install DESTDIR="$dest"
# (Debian's ensurepip seeds pip only into a venv, which is how the build uses this Python;
# pip needs pyexpat and staticx lzma, shared modules the freeze leaves out). A cross-built one
# is tried inside its rootfs, under qemu-user (the caller has registered it with binfmt_misc).
check='import ssl, _hashlib, ctypes, unicodedata, zlib, pyexpat, lzma'
if [ -n "$cross" ]; then
  logged "$src/python.log" chroot "$dest" /usr/bin/env -i ${QEMU_CPU:+QEMU_CPU="$QEMU_CPU"} LD_LIBRARY_PATH="$prefix/lib" \
    "$prefix/bin/python3.11" -c "$check"
else
  logged "$src/python.log" "$prefix/bin/python3.11" -c "$check"
fi
rm -rf "$src/openssl" "$src/python"
echo "$want" > "$dest$prefix/.ready"
echo "small_python: ready in $dest$prefix" >&2
