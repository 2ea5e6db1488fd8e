#!/usr/bin/env bash
# Run here, in the repository's root, before bench/gpu/run.sh goes to a lent GPU machine (which can fetch
# nothing): downloads bench/gpu/wheels.txt for that machine's Python 3.12 into .whl/ (about 10 MB, ignored by
# git through .git/info/exclude), for the device call to carry (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
grep -v '^#' bench/gpu/wheels.txt | xargs python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl
ls .whl | wc -l
