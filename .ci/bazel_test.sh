#!/usr/bin/env bash
# Build and test sm3_tf with Bazel, offline.
#
#   bash .ci/bazel_test.sh [bazel test flags and targets]   (default: //:all)
#
# VENV: the virtualenv with tensorflow, keras, numpy, pytest and hypothesis
#       (default: $PWD/.venv); tests run with its python3.
# BAZEL_OUTPUT_USER_ROOT: optional Bazel --output_user_root (default: Bazel's,
#       under ~/.cache/bazel, outside the repository).
# Installs Debian's bazel-bootstrap (Bazel 4.2.3) if `bazel` is missing.
# Test results are never taken from Bazel's cache (see below).
# Exits with Bazel's status: 0 when every test passed, 3 when a test failed,
# another non-zero status on any other error (2: the virtualenv is missing).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv_arg="${VENV:-$PWD/.venv}"
VENV="$(cd "$venv_arg" 2>/dev/null && pwd)" || {
    echo "bazel_test.sh: no virtualenv at ${venv_arg} (set VENV)" >&2
    exit 2
}
if ! "$VENV/bin/python3" -c "import pytest" >/dev/null 2>&1; then
    echo "bazel_test.sh: $VENV/bin/python3 missing or lacks pytest" >&2
    exit 2
fi

if ! command -v bazel >/dev/null 2>&1; then
    echo "bazel_test.sh: installing bazel-bootstrap (Bazel 4.2.3) with apt-get"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q bazel-bootstrap
fi

TEST_PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export PATH="$VENV/bin:$PATH"

startup=()
if [ -n "${BAZEL_OUTPUT_USER_ROOT:-}" ]; then
    startup+=("--output_user_root=$BAZEL_OUTPUT_USER_ROOT")
fi

args=("$@")
if [ "${#args[@]}" -eq 0 ]; then args=("//:all"); fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
start=$(date +%s)
set +e
# --nocache_test_results: the venv is invisible to Bazel, so a cached PASSED
# could hide a changed package; pass --cache_test_results=auto to allow it.
bazel "${startup[@]}" test --test_env=PATH="$TEST_PATH" --nocache_test_results \
    "${args[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
end=$(date +%s)

passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?PASSED' "$log" || true)
failed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(FAILED|TIMEOUT|NO STATUS|INCOMPLETE|FLAKY)' "$log" || true)
echo "bazel test took $((end - start))s, exit status $status"
echo "bazel: ${passed} passed, ${failed} failed"
exit "$status"
