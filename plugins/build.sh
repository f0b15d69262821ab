#!/usr/bin/env bash
# Build every plugin from source into plugins/build/, a directory of plugins:
#   plugins/<name>/<name>.wat          -> plugins/build/<name>.wasm  (wasmtime.wat2wasm)
#   plugins/<name>/*.c                 -> plugins/build/<name>.wasm  (clang, wasm32-wasi reactor)
#   plugins/<name>/*.ts | package.json -> plugins/build/<name>.wasm  (AssemblyScript: asc -O3 --runtime minimal;
#                                         an Extism plugin, importing @extism/as-pdk: the default runtime)
#   plugins/<name>/app.py              -> plugins/build/<name>.wasm  (Python: componentize-py, a component)
#   plugins/<name>/<name>.toml         -> plugins/build/<name>.toml  (manifest, copied)
#
# Usage: plugins/build.sh [-f|--force] [-o|--out DIR] [NAME...]     (no NAME: every plugin)
#   -o DIR  build into DIR instead of plugins/build/ (relative to where the script is started)
# Incremental: a wasm is rebuilt only when a source, its SDK (C header, AssemblyScript or Python
# guest SDK, WIT world) or this script is newer than it.
#
# Toolchains: C needs clang + wasi-libc (Debian packages below). AssemblyScript needs node (>= 20)
# and npm: the compiler is installed once with npm into sdk/guest/assemblyscript/node_modules (pinned
# by its package-lock.json). Python plugins need componentize-py next to $PYTHON (pip install
# componentize-py). Without Node.js or componentize-py, those plugins are skipped with one line saying
# why, not failed: everything else is still built and the exit status is 0.
#
# Environment:
#   PYTHON          python with the `wasmtime` module, for .wat (default: python3); componentize-py is
#                   looked up next to it, then on PATH
#   CLANG           clang driver (default: clang)
#   WASI_SYSROOT    sysroot holding wasi-libc (default: /usr, Debian's layout)
#   EXTRA_CFLAGS    appended to the C flags
#   NPM             npm (default: npm)
#   EXTRA_ASCFLAGS  appended to the asc flags (e.g. "--runtime incremental")
#   COMPONENTIZE_PY componentize-py executable (default: found as above)
set -euo pipefail

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
START_DIR="$(pwd)"
# Relative tool paths are relative to where the script was started.
for var in PYTHON CLANG WASI_SYSROOT NPM COMPONENTIZE_PY; do
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
NPM="${NPM:-npm}"
AS_SDK="sdk/guest/assemblyscript"
PY_SDK="sdk/guest/python"
NODE_HINT="AssemblyScript plugins need Node.js >= 20 and npm (Debian 13: apt-get install nodejs npm; older Debian and Ubuntu releases ship an older Node.js: use the Node.js 22 packages of https://deb.nodesource.com)"

# --stack-first: the C shadow stack sits below the data, so overflowing it
# traps (out-of-bounds access) instead of silently overwriting static data.
# shellcheck disable=SC2206
CFLAGS=(--target=wasm32-wasi "--sysroot=$WASI_SYSROOT" -O2 -mexec-model=reactor -Wl,--strip-all
        -Wl,--stack-first -I "$SDK_DIR" -Wall -Wextra -Werror ${EXTRA_CFLAGS:-})

force=0
want_out=0
names=()
for arg in "$@"; do
    if [ "$want_out" -eq 1 ]; then
        # relative to where the script was started, like the tool paths above
        case "$arg" in /*) OUT_DIR="$arg" ;; *) OUT_DIR="$START_DIR/$arg" ;; esac
        want_out=0
        continue
    fi
    case "$arg" in
        -f|--force) force=1 ;;
        -o|--out) want_out=1 ;;
        -h|--help) sed -n '2,28p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
        *) names+=("$arg") ;;
    esac
done
[ "$want_out" -eq 0 ] || { echo "build.sh: -o needs a directory" >&2; exit 2; }

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

# The AssemblyScript compiler: installed once by npm into the SDK's own node_modules, so every AS
# plugin builds with the version the SDK's package-lock.json pins (`npm ci`), and reinstalled when the
# SDK's package.json or lock file changes. Returns 1 with AS_MISSING set when Node.js or npm is absent
# or too old (the AS plugins are then skipped); a failed install is an error.
as_checked=0   # 0: not looked at yet, 1: ready, 2: unavailable (AS_MISSING says why)
AS_MISSING=""
ASC="$AS_SDK/node_modules/.bin/asc"
check_as_tools() {
    [ "$as_checked" -eq 1 ] && return 0
    [ "$as_checked" -eq 2 ] && return 1
    as_checked=2
    if ! command -v node >/dev/null 2>&1; then
        AS_MISSING="Node.js is not installed"; return 1
    fi
    if ! command -v "$NPM" >/dev/null 2>&1; then
        AS_MISSING="$NPM (npm) is not installed"; return 1
    fi
    local major
    major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
    if ! [ "$major" -ge 20 ] 2>/dev/null; then
        AS_MISSING="node $(node --version 2>/dev/null || echo '(unknown version)') is too old"; return 1
    fi
    local stamp="$AS_SDK/node_modules/.sandbus-installed"
    if [ ! -x "$ASC" ] || [ ! -f "$stamp" ] || [ "$AS_SDK/package.json" -nt "$stamp" ] \
            || { [ -f "$AS_SDK/package-lock.json" ] && [ "$AS_SDK/package-lock.json" -nt "$stamp" ]; }; then
        local how=install
        [ -f "$AS_SDK/package-lock.json" ] && how=ci
        echo "NPM   $NPM $how in $AS_SDK (the AssemblyScript compiler)"
        if ! (cd "$AS_SDK" && "$NPM" "$how" --no-audit --no-fund --loglevel=error); then
            die "$NPM $how failed in $AS_SDK (is the npm registry reachable?)"
        fi
        [ -x "$ASC" ] || die "$NPM $how did not install $ASC"
        touch "$stamp"
    fi
    as_checked=1
}

# Plugins skipped for a missing toolchain, reported once per toolchain at the end.
skipped_as=()
skipped_py=()

# A plugin with its own package.json (extra npm dependencies) gets `npm install` in its directory
# (`npm ci` when a package-lock.json pins them), again only when one of them changed.
npm_plugin_deps() {
    local dir="$1" stamp="$1/node_modules/.sandbus-installed" how=install
    [ -f "$dir/package.json" ] || return 0
    [ -f "$dir/package-lock.json" ] && how=ci
    if [ ! -f "$stamp" ] || [ "$dir/package.json" -nt "$stamp" ] \
            || { [ -f "$dir/package-lock.json" ] && [ "$dir/package-lock.json" -nt "$stamp" ]; }; then
        echo "NPM   $NPM $how in $dir"
        (cd "$dir" && "$NPM" "$how" --no-audit --no-fund --loglevel=error) || return 1
        touch "$stamp"
    fi
}

# componentize-py: next to $PYTHON (the venv's script), else on PATH. Missing means "skip the Python
# plugins", not "fail the build": the C, WAT and AssemblyScript plugins stay buildable without it.
py_checked=0
CPY=""
find_componentize_py() {
    [ "$py_checked" -eq 1 ] && { [ -n "$CPY" ]; return; }
    py_checked=1
    if [ -n "${COMPONENTIZE_PY:-}" ]; then
        CPY="$COMPONENTIZE_PY"
    else
        local py_path
        py_path="$(command -v "$PYTHON" 2>/dev/null || true)"
        if [ -n "$py_path" ] && [ -x "$(dirname "$py_path")/componentize-py" ]; then
            CPY="$(dirname "$py_path")/componentize-py"
        elif command -v componentize-py >/dev/null 2>&1; then
            CPY="$(command -v componentize-py)"
        fi
    fi
    [ -n "$CPY" ] && "$CPY" --version >/dev/null 2>&1 || CPY=""
    [ -n "$CPY" ]
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
    as_sdk_srcs=("$AS_SDK"/index.ts "$AS_SDK"/assembly/*.ts "$AS_SDK"/package-lock.json)
    py_sdk_srcs=("$PY_SDK"/*.py "$PY_SDK"/wit/*.wit)
    shopt -u nullglob
    # AssemblyScript and Python sources anywhere below the plugin (not in node_modules / caches).
    mapfile -t tsrcs < <(find "$dir" -name node_modules -prune -o -name '*.ts' -type f -print | sort)
    mapfile -t pysrcs < <(find "$dir" \( -name __pycache__ -o -name node_modules \) -prune -o -name '*.py' -type f -print | sort)
    dir_pkg=""
    [ -f "$dir/package.json" ] && dir_pkg="$dir/package.json"

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
    elif [ -f "$dir/package.json" ] || [ ${#tsrcs[@]} -gt 0 ]; then
        if [ -f "$dir/assembly/index.ts" ]; then entry="$dir/assembly/index.ts"; else entry="$dir/$name.ts"; fi
        [ -f "$entry" ] || die "$dir: AssemblyScript entry point not found (expected $dir/assembly/index.ts or $entry)"
        dir_lock=""
        [ -f "$dir/package-lock.json" ] && dir_lock="$dir/package-lock.json"
        if needs_build "$out" "${tsrcs[@]}" "${as_sdk_srcs[@]}" "$AS_SDK/package.json" "$SCRIPT" \
                ${dir_pkg:+"$dir_pkg"} ${dir_lock:+"$dir_lock"}; then
            if ! check_as_tools; then
                skipped_as+=("$name")
                continue
            fi
            npm_plugin_deps "$dir" || { echo "build.sh: error: npm install failed in $dir" >&2; status=1; continue; }
            asc="$ASC"
            [ -x "$dir/node_modules/.bin/asc" ] && asc="$dir/node_modules/.bin/asc"
            # abort(): the SDK's sandbusAbort logs the message through sandbus_v1.log and traps; without
            # the SDK, `--use abort=` compiles aborts to a bare trap. Either way no `env.abort` import.
            # The name is the SDK file's path as asc sees it: relative import or package import.
            abort="--use=abort="
            # An Extism plugin (Extism's PDK): no host calls a collector between calls, so it keeps
            # AssemblyScript's default (incremental) runtime, which collects inside its allocations.
            runtime=minimal
            grep -qs '@extism/as-pdk' "${tsrcs[@]}" && runtime=incremental
            if grep -qs 'sdk/guest/assemblyscript' "${tsrcs[@]}"; then
                abort="--use=abort=$AS_SDK/assembly/index/sandbusAbort"
            elif grep -qs '@sandbus/guest' "${tsrcs[@]}"; then
                abort="--use=abort=~lib/@sandbus/guest/assembly/index/sandbusAbort"
            fi
            echo "ASC   $entry -> $out"
            # shellcheck disable=SC2086
            # asc looks up packages below the directory it runs in (the repository root): point it at the
            # plugin's own node_modules too.
            paths=()
            [ -d "$dir/node_modules" ] && paths=(--path "$dir/node_modules")
            if ! "$asc" "$entry" -o "$out.tmp" -O3 --runtime "$runtime" "$abort" "${paths[@]}" ${EXTRA_ASCFLAGS:-}; then
                rm -f "$out.tmp"
                echo "build.sh: error: $name failed to compile" >&2
                status=1
                continue
            fi
            mv -f "$out.tmp" "$out"
        else
            echo "ok    $out (up to date)"
        fi
    elif [ ${#pysrcs[@]} -gt 0 ]; then
        if [ -f "$dir/app.py" ]; then app="app"; else app="$name"; fi
        [ -f "$dir/$app.py" ] || die "$dir: Python entry module not found (expected $dir/app.py or $dir/$name.py)"
        if needs_build "$out" "${pysrcs[@]}" "${py_sdk_srcs[@]}" "$SCRIPT"; then
            if ! find_componentize_py; then
                skipped_py+=("$name")
                continue
            fi
            echo "PY    $dir/$app.py -> $out (componentize-py, a component)"
            # An empty VIRTUAL_ENV: otherwise componentize-py adds the site-packages of whatever Python
            # it finds (the build venv's), and the component depends on the build machine.
            novenv="$(mktemp -d)"
            mkdir -p "$novenv/lib/site-packages"
            if ! env VIRTUAL_ENV="$novenv" PYTHONDONTWRITEBYTECODE=1 "$CPY" -q -d "$PY_SDK/wit" -w plugin \
                    componentize "$app" -p "$dir" -p "$PY_SDK" -o "$out.tmp"; then
                rm -rf "$novenv" "$out.tmp"
                echo "build.sh: error: $name failed to componentize" >&2
                status=1
                continue
            fi
            rm -rf "$novenv"
            mv -f "$out.tmp" "$out"
        else
            echo "ok    $out (up to date)"
        fi
    else
        die "$dir has no source: $name.wat, *.c, *.ts / package.json (AssemblyScript) or app.py (Python)"
    fi

    if ! cmp -s "$manifest" "$OUT_DIR/$name.toml"; then
        cp "$manifest" "$OUT_DIR/$name.toml"
    fi
done
if [ ${#skipped_as[@]} -gt 0 ]; then
    echo "skip  ${skipped_as[*]} (AssemblyScript): $AS_MISSING; $NODE_HINT"
fi
if [ ${#skipped_py[@]} -gt 0 ]; then
    echo "skip  ${skipped_py[*]} (Python): componentize-py is not installed (pip install componentize-py next to $PYTHON, or set COMPONENTIZE_PY)"
fi
exit "$status"
