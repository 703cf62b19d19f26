#!/usr/bin/env bash
# Two revisions of the launcher on the same card in one call: each named run of benchmarks/speed_gpu.py, first from
# this tree, then from an archive of another revision, one after the other, so that both see the same machine.
#
#   git archive <REV> -o bench_old.tar                                  # on the machine with the repository
#   CPT_GIT_REVISION=<this rev> OLD_REVISION=<REV> bash benchmarks/ab_revisions_gpu.sh bench_old.tar fsdp-1gpu zero3-1gpu
#
# Needs bench_assets/ (speed_gpu.py builds it when missing). Results: benchmarks/results/<date>-ab-{new,old}-<run>-
# <card>.json from this tree's speed_gpu.py and the old one's, both also copied to $OUT when it is set.
set -euo pipefail
old_tar=$1
shift
here=$(pwd)
old=$(mktemp -d /tmp/ab-old.XXXX)
tar -xf "$old_tar" -C "$old"
assets=$(realpath bench_assets)
steps=${STEPS:-9}
timeout=${RUN_TIMEOUT:-110}
for run in "$@"; do
  python benchmarks/speed_gpu.py --assets "$assets" --out /tmp/ab/new --steps "$steps" --timeout "$timeout" \
    --name "ab-new-$run" --runs "$run"
  (cd "$old" && CPT_GIT_REVISION=${OLD_REVISION:-old} PYTHONPATH="$old:${PYTHONPATH:-}" \
    python benchmarks/speed_gpu.py --assets "$assets" --out /tmp/ab/old --steps "$steps" --timeout "$timeout" \
    --name "ab-old-$run" --runs "$run" --results "$here/benchmarks/results")
done
