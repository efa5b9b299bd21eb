#!/bin/sh
echo "bazel coverage is not supported with the offline @remote_coverage_tools stand-in" >&2
exit 1
