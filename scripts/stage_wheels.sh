#!/usr/bin/env bash
# Carry the FlashAttention-4 wheels (the `sparge[fa4]` extra) to a GPU host that has no package index,
# in parts small enough to travel next to the repository (the device tool sends the working tree plus
# the carried paths, 64 MiB in all; the tree itself is ~37 MB, so a part is at most ~27 MB).
#
#   bash scripts/stage_wheels.sh build [PART_MB]   # here (pip reaches PyPI): download the wheels, install
#                                                  # them for CPython 3.12 into a folder (pip --target
#                                                  # --python-version: nothing runs), xz it, split it into
#                                                  # .bundle-fa4/part-1 .. part-K (ignored by git)
#   bash scripts/stage_wheels.sh receive PART_DIR  # there, once per part (one call each, carry=[PART_DIR]):
#                                                  # verify and copy into $STAGE (outside the repo copy)
#   bash scripts/stage_wheels.sh install           # there, once every part is staged: join, verify and
#                                                  # unpack the installed tree into $SITE
#   bash scripts/stage_wheels.sh env               # prints the PYTHONPATH export for $SITE
#
# $STAGE defaults to $HOME/.cache/sparge/fa4-stage and $SITE to $HOME/.cache/sparge/fa4-site; both live
# as long as the GPU machine stays warm between calls (a fresh machine needs every part again).
# The wheels (CPython 3.12, manylinux x86_64; the GPU image already has torch, einops, numpy,
# typing-extensions, protobuf and cuda-bindings):
#   flash-attn-4 4.0.0b36 (0.5 MB), nvidia-cutlass-dsl 4.8.1 (10 kB), nvidia-cutlass-dsl-libs-base 4.8.1
#   (3.1 MB), nvidia-cutlass-dsl-libs-core 4.8.1 (1.6 MB), nvidia-cutlass-dsl-libs-cu13 4.8.1 (92 MB),
#   apache-tvm-ffi 0.1.15.post2 (3.3 MB), torch-c-dlpack-ext 0.1.5 (0.9 MB), quack-kernels 0.6.5 (0.7 MB).
# nvidia-cutlass-dsl's declared -libs-cu12 dependency is left out on purpose (the CUDA 13 libraries
# replace it on this cu130 image); installs use --no-deps. Compressed, the ~255 MB tree is ~65 MB: three
# parts of 27 MB.
set -euo pipefail
STAGE=${STAGE:-$HOME/.cache/sparge/fa4-stage}
SITE=${SITE:-$HOME/.cache/sparge/fa4-site}
OUTDIR=${OUTDIR:-.bundle-fa4}
WHEELS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
        torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5)
die() { echo "stage_wheels: $*" >&2; exit 2; }
# a --target install does not run .pth files: nvidia-cutlass-dsl's puts dsl_packages (cutlass) on sys.path
paths() { echo "$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages"; }

build() {
    local part_mb=${1:-27} python=${PYTHON:-python3}
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    local work=$WORK
    mkdir -p "$work/wheels"
    local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
                --platform manylinux2014_x86_64 --platform any)
    "$python" -m pip download --quiet --no-deps --pre "${plat[@]}" -d "$work/wheels" "${WHEELS[@]}"
    [ "$(ls "$work/wheels" | wc -l)" -eq "${#WHEELS[@]}" ] || die "expected ${#WHEELS[@]} wheels, got: $(ls "$work/wheels")"
    # install here for the target interpreter (no code runs): an unzipped tree compresses to ~2/3 of
    # the zipped wheels, and the GPU host then only unpacks it
    "$python" -m pip install --quiet --no-deps --no-compile --no-index "${plat[@]}" --target "$work/site" \
        "$work"/wheels/*.whl
    (cd "$work/wheels" && sha256sum *.whl) > "$work/site/FA4-WHEELS.sha256"
    echo "compressing $(du -sh "$work/site" | cut -f1) of installed wheels (xz, a few minutes)"
    tar -C "$work" -cf - site | xz -6 -T0 > "$work/fa4-site.tar.xz"
    local sum; sum=$(sha256sum "$work/fa4-site.tar.xz" | cut -d' ' -f1)
    rm -rf "$OUTDIR"
    split -b "${part_mb}000000" -d -a 2 "$work/fa4-site.tar.xz" "$work/chunk."
    local i=0 chunk
    for chunk in "$work"/chunk.*; do
        i=$((i + 1))
        mkdir -p "$OUTDIR/part-$i"
        mv "$chunk" "$OUTDIR/part-$i/"
    done
    for d in "$OUTDIR"/part-*; do
        printf 'bundle=%s\nparts=%s\nxz_sha256=%s\n' "${sum:0:12}" "$i" "$sum" > "$d/PART.txt"
        (cd "$d" && sha256sum chunk.* > SHA256SUMS)
    done
    local tree; tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo "bundle ${sum:0:12}: $i parts in $OUTDIR (ignored by git); tracked tree $((tree / 1000000)) MB, and the"
    echo "tree plus one part must stay under 67 MB (64 MiB) per device call:"
    du -sb "$OUTDIR"/part-* | awk '{printf "  %s  %.1f MB\n", $2, $1 / 1e6}'
}

receive() {
    local part=${1:?receive needs a part folder}
    [ -f "$part/PART.txt" ] && [ -f "$part/SHA256SUMS" ] || die "$part is not a part folder (no PART.txt/SHA256SUMS)"
    (cd "$part" && sha256sum --quiet -c SHA256SUMS) || die "$part: a chunk does not match its sha256"
    mkdir -p "$STAGE"
    if [ -f "$STAGE/PART.txt" ] && ! cmp -s <(grep ^bundle= "$part/PART.txt") <(grep ^bundle= "$STAGE/PART.txt"); then
        echo "stage_wheels: $STAGE held another bundle; starting over" >&2
        rm -rf "${STAGE:?}"/*
    fi
    cp "$part"/chunk.* "$STAGE/"
    cp "$part/PART.txt" "$STAGE/PART.txt"
    local want have; want=$(grep ^parts= "$STAGE/PART.txt" | cut -d= -f2); have=$(ls "$STAGE"/chunk.* | wc -l)
    echo "staged $(basename "$part"): $have of $want parts in $STAGE"
}

install() {
    [ -f "$STAGE/PART.txt" ] || die "nothing staged in $STAGE (run receive for every part first)"
    local want have; want=$(grep ^parts= "$STAGE/PART.txt" | cut -d= -f2); have=$(ls "$STAGE"/chunk.* | wc -l)
    [ "$have" -eq "$want" ] || die "have $have of $want parts in $STAGE; receive the others first"
    local sum; sum=$(cat "$STAGE"/chunk.* | sha256sum | cut -d' ' -f1)
    [ "$sum" = "$(grep ^xz_sha256= "$STAGE/PART.txt" | cut -d= -f2)" ] || die "joined parts do not match the bundle's sha256"
    rm -rf "$SITE" "$SITE.tmp" && mkdir -p "$SITE.tmp"
    cat "$STAGE"/chunk.* | xz -dc | tar -C "$SITE.tmp" -xf - && mv "$SITE.tmp/site" "$SITE" && rmdir "$SITE.tmp"
    PYTHONPATH="$(paths)${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import flash_attn.cute, cutlass; print('fa4 importable')"
    echo "installed into $SITE; use: export PYTHONPATH=$(paths)\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
    build) shift; build "$@" ;;
    receive) shift; receive "$@" ;;
    install) install ;;
    env) echo "export PYTHONPATH=$(paths)\${PYTHONPATH:+:\$PYTHONPATH}" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
