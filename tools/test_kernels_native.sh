#!/bin/sh
# The C kernel test program (csrc/tests/test_kernels.c) on every path, outside Python:
#   1. natively with gcc, and with clang when installed (-Wall -Wextra -Werror);
#   2. the portable-build check: in the x86-64 objects, AVX registers appear only in the
#      dispatched AVX2 / AVX-512 sources, VPDPBUSD / VPDPWSSD and 512-bit registers only in
#      those compiled for AVX-512 (the VNNI variant of avx2, and avx512);
#   3. arm64: cross-compiled with aarch64-linux-gnu-gcc and run under qemu-aarch64 twice,
#      -cpu max (NEON with dotprod) and -cpu cortex-a53 (NEON without it), plus the same
#      object check for SDOT; and cross-compiled with clang too when installed;
#   4. Windows x86-64 (the Win32 side of the thread pool in csrc/threads.c): cross-compiled with
#      MinGW-w64 and run under wine, on x86-64 hosts where both are installed.
# Needs the Debian packages gcc-aarch64-linux-gnu and qemu-user (apt-get install them); step 4
# needs gcc-mingw-w64-x86-64 and wine64, and is skipped, saying so, without them.
# Usage: tools/test_kernels_native.sh   (from anywhere; exits non-zero on any failure)
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cflags="-O2 -std=c11 -fno-strict-aliasing -Wall -Wextra -Werror -I$root/csrc"
sources=$(ls "$root"/csrc/*.c | grep -v '/crc32c\.c$')

build_and_run() {  # compiler, output name, runner...
    cc=$1 out=$2
    shift 2
    echo "== $cc"
    # shellcheck disable=SC2086
    $cc $cflags $sources "$root/csrc/tests/test_kernels.c" -o "$work/$out" -lm -pthread
    "$@" "$work/$out"
}

# Objects in which instructions matching $2 may appear: only those named by $3 (a grep -E).
check_objects() {  # compiler, objdump, instruction pattern, allowed object pattern
    cc=$1 dump=$2 pattern=$3 allowed=$4
    for src in $sources; do
        obj="$work/$(basename "$src" .c).o"
        # shellcheck disable=SC2086
        $cc $cflags -c "$src" -o "$obj"
        if "$dump" -d "$obj" | grep -Eq "$pattern"; then
            if ! basename "$obj" | grep -Eq "$allowed"; then
                echo "FAIL: $(basename "$src") holds '$pattern' instructions outside a dispatched function" >&2
                exit 1
            fi
        fi
    done
    echo "== $cc objects: '$pattern' only in $allowed"
}

case $(uname -m) in
x86_64)
    build_and_run gcc test_gcc
    if command -v clang >/dev/null 2>&1; then build_and_run clang test_clang; fi
    check_objects gcc objdump '%[yz]mm' '^kernels_avx(2|2_vnni|512)\.o$'
    check_objects gcc objdump 'vpdpbusd|vpdpwssd' '^kernels_avx(2_vnni|512)\.o$'
    check_objects gcc objdump '%zmm' '^kernels_avx(2_vnni|512)\.o$'
    ;;
aarch64)
    build_and_run gcc test_gcc
    ;;
esac

for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "FAIL: $tool not found; install the Debian packages gcc-aarch64-linux-gnu and qemu-user" >&2
        exit 1
    fi
done
qemu="qemu-aarch64 -L /usr/aarch64-linux-gnu"
build_and_run aarch64-linux-gnu-gcc test_arm64 $qemu -cpu max
echo "== qemu-aarch64 -cpu cortex-a53 (no dotprod)"
$qemu -cpu cortex-a53 "$work/test_arm64"
if command -v clang >/dev/null 2>&1; then   # clang reaches SDOT another way (see kernels_neon.inc)
    build_and_run "clang --target=aarch64-linux-gnu" test_arm64_clang $qemu -cpu max
fi
check_objects aarch64-linux-gnu-gcc aarch64-linux-gnu-objdump '\ssdot\s' '^kernels_neon_dotprod\.o$'

if [ "$(uname -m)" = x86_64 ] && command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 \
        && command -v wine >/dev/null 2>&1; then
    build_and_run x86_64-w64-mingw32-gcc test_windows.exe env WINEDEBUG=-all wine
else
    echo "SKIP windows: needs an x86-64 host with x86_64-w64-mingw32-gcc and wine" \
        "(Debian packages gcc-mingw-w64-x86-64 and wine64)"
fi
echo "all kernel paths passed"
