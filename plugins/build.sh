#!/usr/bin/env bash
# Build every plugin from source into plugins/build/, a directory of plugins:
#   plugins/<name>/<name>.wat          -> plugins/build/<name>.wasm  (wasmtime.wat2wasm)
#   plugins/<name>/*.c                 -> plugins/build/<name>.wasm  (clang, wasm32-wasi reactor)
#   plugins/<name>/<name>.toml         -> plugins/build/<name>.toml  (manifest, copied)
#
# Usage: plugins/build.sh [-f|--force] [NAME...]     (no NAME: every plugin)
# Incremental: a wasm is rebuilt only when a source, the C SDK header (for C
# plugins) or this script is newer than it.
#
# Environment:
#   PYTHON        python with the `wasmtime` module, for .wat (default: python3)
#   CLANG         clang driver (default: clang)
#   WASI_SYSROOT  sysroot holding wasi-libc (default: /usr, Debian's layout)
#   EXTRA_CFLAGS  appended to the C flags
set -euo pipefail

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
# Relative tool paths are relative to where the script was started.
for var in PYTHON CLANG WASI_SYSROOT; do
    val="${!var:-}"
    case "$val" in
        /*|"") ;;
        */*) if [ -e "$val" ]; then
                 printf -v "$var" '%s' "$(cd "$(dirname "$val")" && pwd)/$(basename "$val")"
             fi ;;
    esac
done
cd "$(dirname "$SCRIPT")/.."   # repo root: paths below are relative to it

PYTHON="${PYTHON:-python3}"
CLANG="${CLANG:-clang}"
WASI_SYSROOT="${WASI_SYSROOT:-/usr}"
SDK_DIR="sdk/guest/c"
OUT_DIR="plugins/build"
APT_HINT="install the toolchain with: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32"

# --stack-first: the C shadow stack sits below the data, so overflowing it
# traps (out-of-bounds access) instead of silently overwriting static data.
# shellcheck disable=SC2206
CFLAGS=(--target=wasm32-wasi "--sysroot=$WASI_SYSROOT" -O2 -mexec-model=reactor -Wl,--strip-all
        -Wl,--stack-first -I "$SDK_DIR" -Wall -Wextra -Werror ${EXTRA_CFLAGS:-})

force=0
names=()
for arg in "$@"; do
    case "$arg" in
        -f|--force) force=1 ;;
        -h|--help) sed -n '2,15p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
        *) names+=("$arg") ;;
    esac
done

die() { echo "build.sh: error: $*" >&2; exit 1; }

if [ ${#names[@]} -eq 0 ]; then
    for d in plugins/*/; do
        n="$(basename "$d")"
        [ "$n" = "build" ] && continue
        names+=("$n")
    done
fi
[ ${#names[@]} -gt 0 ] || die "no plugins found under plugins/"

# needs_build OUT SRC...: true when OUT is missing or older than any SRC.
needs_build() {
    local out="$1" src
    shift
    [ "$force" -eq 1 ] && return 0
    [ -f "$out" ] || return 0
    for src in "$@"; do
        [ "$src" -nt "$out" ] && return 0
    done
    return 1
}

wat_checked=0
check_wat_tools() {
    [ "$wat_checked" -eq 1 ] && return 0
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found (set PYTHON to a python with the wasmtime module, e.g. PYTHON=.venv/bin/python)"
    "$PYTHON" -c 'import wasmtime' 2>/dev/null \
        || die "$PYTHON cannot import wasmtime (set PYTHON=.venv/bin/python, or pip install wasmtime)"
    wat_checked=1
}

c_checked=0
check_c_tools() {
    [ "$c_checked" -eq 1 ] && return 0
    command -v "$CLANG" >/dev/null 2>&1 || die "$CLANG not found; $APT_HINT"
    local tmp log
    tmp="$(mktemp -d)"
    log="$tmp/probe.log"
    printf '#include <stdlib.h>\n#include <string.h>\n__attribute__((export_name("probe"))) int probe(int n) { char *p = malloc((size_t)n); if (!p) return 0; memset(p, 1, (size_t)n); n = p[0]; free(p); return n; }\n' > "$tmp/probe.c"
    if ! "$CLANG" --target=wasm32-wasi "--sysroot=$WASI_SYSROOT" -O2 -mexec-model=reactor \
            -o "$tmp/probe.wasm" "$tmp/probe.c" >"$log" 2>&1; then
        echo "build.sh: error: $CLANG cannot build wasm32-wasi reactors with sysroot $WASI_SYSROOT:" >&2
        sed 's/^/    /' "$log" >&2
        rm -rf "$tmp"
        die "wasi-libc, lld or the wasm32 compiler-rt builtins are missing; $APT_HINT"
    fi
    rm -rf "$tmp"
    c_checked=1
}

mkdir -p "$OUT_DIR"
status=0
for name in "${names[@]}"; do
    dir="plugins/$name"
    [ -d "$dir" ] || die "no plugin directory $dir"
    manifest="$dir/$name.toml"
    out="$OUT_DIR/$name.wasm"
    [ -f "$manifest" ] || die "$dir has no manifest $name.toml"

    shopt -s nullglob
    csrcs=("$dir"/*.c)
    cheaders=("$dir"/*.h "$SDK_DIR"/*.h)
    shopt -u nullglob

    if [ -f "$dir/$name.wat" ]; then
        if needs_build "$out" "$dir/$name.wat" "$SCRIPT"; then
            check_wat_tools
            echo "WAT   $dir/$name.wat -> $out"
            if ! "$PYTHON" -c '
import sys, wasmtime
src, dst = sys.argv[1], sys.argv[2]
with open(src, encoding="utf-8") as f:
    wasm = wasmtime.wat2wasm(f.read())
with open(dst, "wb") as f:
    f.write(wasm)
' "$dir/$name.wat" "$out.tmp"; then
                rm -f "$out.tmp"
                echo "build.sh: error: $dir/$name.wat failed to assemble" >&2
                status=1
                continue
            fi
            mv -f "$out.tmp" "$out"
        else
            echo "ok    $out (up to date)"
        fi
    elif [ ${#csrcs[@]} -gt 0 ]; then
        if needs_build "$out" "${csrcs[@]}" "${cheaders[@]}" "$SCRIPT"; then
            check_c_tools
            echo "CC    ${csrcs[*]} -> $out"
            if ! "$CLANG" "${CFLAGS[@]}" -o "$out.tmp" "${csrcs[@]}"; then
                rm -f "$out.tmp"
                echo "build.sh: error: $name failed to compile" >&2
                status=1
                continue
            fi
            mv -f "$out.tmp" "$out"
        else
            echo "ok    $out (up to date)"
        fi
    else
        die "$dir has neither $name.wat nor any .c source"
    fi

    if ! cmp -s "$manifest" "$OUT_DIR/$name.toml"; then
        cp "$manifest" "$OUT_DIR/$name.toml"
    fi
done
exit "$status"
