# Shared by scripts/demo and scripts/test: make (or reuse) a virtual environment
# with ckptbridge installed from this checkout.  Sourced, not run.
#   make_venv DIR with-tf|no-tf|demo
# with-tf and no-tf are the test venvs; demo is what `pip install 'ckptbridge[tf]'` gives a user.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

find_python() {
    for p in "${PYTHON:-}" python3.11 python3; do
        if [ -n "$p" ] && command -v "$p" >/dev/null 2>&1; then
            if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
                echo "$p"; return 0
            fi
        fi
    done
    echo "scripts: error: need Python 3.11 or newer; set PYTHON=/path/to/python" >&2
    return 1
}

make_venv() {
    local dir=$1 flavour=$2
    local stamp="$dir/.ckptbridge-stamp"
    local want
    want=$(cat "$ROOT/pyproject.toml" "$ROOT"/requirements/*.txt | sha256sum | cut -d' ' -f1)-$flavour
    if [ -x "$dir/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    local py
    py=$(find_python)
    echo "setting up $dir ($flavour) with $py ..." >&2
    rm -rf "$dir"
    "$py" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    if [ "$flavour" = demo ]; then
        # scripts/demo: the [tf] extra at the tested pins, and nothing of the tests (no torch, timm, moto).
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[tf]" -c "$ROOT/requirements/tf.txt"
        echo "$want" > "$stamp"
        return 0
    fi
    # Both test venvs: the test tools and the [remote] extra (the TensorFlow-free suite reads over HTTP).
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,remote]" -c "$ROOT/requirements/remote.txt"
    if [ "$flavour" = with-tf ]; then
        # What `pip install 'ckptbridge[tf]'` gives a user (one TensorFlow, the one tf-keras requires),
        # pinned by the constraints file; then the test-only packages in one resolve, held to the same pins.
        local pins=(-c "$ROOT/requirements/tf.txt" -c "$ROOT/requirements/remote.txt")
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,remote,tf]" "${pins[@]}"
        if [ -f "$ROOT/requirements/test-extra.txt" ]; then
            "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements/test-extra.txt" "${pins[@]}"
        fi
    fi
    echo "$want" > "$stamp"
}
