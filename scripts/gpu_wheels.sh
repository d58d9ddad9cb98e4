#!/usr/bin/env bash
# Fetch, on this machine (which reaches the package registry), what bench/gpu_check.py needs on a lent
# GPU machine that has torch, transformers, accelerate and peft but no network: the wheels it may lack,
# and CLIP's tokenizer files (derived offline from open_clip's BPE table, which the device may lack).
# The folder travels as a carried path of the device `run` call, so it must stay under 64 MiB.
#
#   bash scripts/gpu_wheels.sh                 # -> .gpu_wheels/ (gitignored)
#   bash scripts/gpu_wheels.sh --no-pillow     # leave out the Pillow fallback wheels (~21 MiB)
#   bash scripts/gpu_wheels.sh --dest shared_wheels
#
# gpu_check.py installs only what the device lacks (pip install --no-deps --no-index from this folder
# into a temporary target directory), so carrying a wheel the device already has costs nothing there.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PILLOW=1
while [ $# -gt 0 ]; do
    case "$1" in
        --dest) DEST="$2"; shift 2 ;;
        --no-pillow) PILLOW=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done
LIMIT=$((64 * 1024 * 1024))
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

version() {  # the version installed in the project's venv: the device runs what the tests ran
    "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'
}

DIFFUSERS=$(version diffusers)
[ -n "$DIFFUSERS" ] || { echo "diffusers is not installed in $PY's environment (run scripts/setup.sh)" >&2; exit 1; }
# The peer version bench_policy.py compares against (trl removed DDPOTrainer after 0.23.1).
TRL=$(grep -o 'trl==[0-9][0-9.]*' bench/bench_policy.py | head -1 | cut -d= -f3)
TRL=${TRL:-0.23.1}

rm -rf "$DEST"
mkdir -p "$DEST"
download() {  # pip download --no-deps into $DEST; extra arguments pick platform / python version
    "$PY" -m pip download --no-deps --disable-pip-version-check --quiet -d "$DEST" "$@" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
}

echo "diffusers==$DIFFUSERS trl==$TRL"
download "diffusers==$DIFFUSERS" "trl==$TRL"

# Pure-python packages that diffusers (requests) and poseloop.sampling.round (sqlalchemy) import but that
# torch/transformers/accelerate/peft do not pull in; fetched as py3-none-any so any Python can use them.
PURE=()
for dist in requests urllib3 idna certifi charset-normalizer sqlalchemy; do
    v=$(version "$dist")
    PURE+=("$dist${v:+==$v}")
done
echo "pure-python fallbacks: ${PURE[*]}"
download --only-binary=:all: --platform any --implementation py --python-version 3.11 "${PURE[@]}"

if [ "$PILLOW" = 1 ]; then
    # Pillow is compiled: one wheel per CPython the device might run. Missing versions are skipped.
    PIL_V=$(version pillow)
    for pyv in 3.11 3.12 3.13; do
        download --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
            --implementation cp --python-version "$pyv" "pillow${PIL_V:+==$PIL_V}"
    done
fi

"$PY" - "$DEST/clip_tokenizer" <<'EOF'
import sys
from pathlib import Path

from poseloop.models.embedded import write_clip_tokenizer_files

write_clip_tokenizer_files(Path(sys.argv[1]))
EOF

for want in "diffusers-$DIFFUSERS" "trl-$TRL"; do
    ls "$DEST"/"$want"-*.whl >/dev/null 2>&1 || { echo "missing wheel $want in $DEST" >&2; exit 1; }
done

ls -l "$DEST" "$DEST/clip_tokenizer"
SIZE=$(du -sb "$DEST" | cut -f1)
# The working tree travels too; count it so that a tight total shows up here, not on the device.
TREE=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo "$DEST: $((SIZE / 1024)) KiB; working tree: $((TREE / 1024)) KiB; together $(((SIZE + TREE) / 1024)) KiB (limit 65536 KiB)"
if [ "$SIZE" -gt "$LIMIT" ]; then
    echo "FAIL: $DEST is over 64 MiB; rerun with --no-pillow" >&2
    exit 1
fi
if [ $((SIZE + TREE)) -gt "$LIMIT" ]; then
    echo "WARNING: with the working tree the transfer is over 64 MiB; rerun with --no-pillow if the run tool refuses" >&2
fi
echo "OK: carry [\"$DEST\"] and run: python3 bench/gpu_check.py (see bench/README.md)"
