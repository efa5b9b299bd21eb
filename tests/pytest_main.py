"""Entry point for Bazel's py_test targets: runs pytest on the files in argv.

BUILD passes each test file as an argument (`$(location ...)`), so every
py_test target is one ordinary pytest run, with pytest's exit status.
"""

import os
import sys

import pytest


def main(argv):
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        # Keep Hypothesis' example database out of the (read-only) runfiles.
        os.environ.setdefault(
            "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmp, ".hypothesis")
        )
        # And SM3's built CPU kernel (sm3_tf/kernels/native.py) out of $HOME.
        os.environ.setdefault("SM3_TF_CACHE", os.path.join(tmp, "sm3_tf"))
    args = ["-p", "no:cacheprovider", "-q"]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append("--junitxml=" + xml)
    return pytest.main(args + list(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
