#!/usr/bin/env bash
# Verify, stage, reassemble and install a bundle made by scripts/offline_bundle.py.
#
#   scripts/offline_install.sh [--stage DIR] [--target DIR] [--corpora-dir DIR] [--models-dir DIR]
#                              [--python PY] PART_DIR...
#
# Each PART_DIR (part-001, part-002, ...) is checked against its SHA256SUMS and copied into the
# staging folder (default: $XDG_CACHE_HOME/sparge/offline-stage/<bundle id>, outside the repo), so
# the parts may arrive in separate calls. Once every part is staged, the chunks are joined, the
# tar's sha256 and every payload file's sha256 are checked, the wheels are installed with
# `pip install --no-index --no-deps --target TARGET`, the corpora are unpacked into the sparge
# corpus cache and model files are copied into the models folder. Run it again with the same
# --stage for the remaining parts; it says what is still missing and exits 0 until then.
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/sparge"
stage_root="$cache/offline-stage"
target="$cache/site-packages"
corpora_dir="$cache/corpora"
models_dir="$cache/offline-models"
python=python3
parts=()

die() { echo "offline_install: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --stage) stage_root="$2"; shift 2 ;;
        --target) target="$2"; shift 2 ;;
        --corpora-dir) corpora_dir="$2"; shift 2 ;;
        --models-dir) models_dir="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) parts+=("$1"); shift ;;
    esac
done
[ ${#parts[@]} -gt 0 ] || die "give at least one part folder (see --help)"

field() { grep -m1 "^$1=" "$2" | cut -d= -f2-; }

# 1. verify each given part and copy it into the staging folder of its bundle
bundle_id=""
for part in "${parts[@]}"; do
    [ -f "$part/BUNDLE.txt" ] && [ -f "$part/SHA256SUMS" ] || die "$part is not a bundle part (no BUNDLE.txt/SHA256SUMS)"
    id=$(field bundle_id "$part/BUNDLE.txt")
    [ -z "$bundle_id" ] || [ "$id" = "$bundle_id" ] || die "parts of different bundles given ($bundle_id and $id)"
    bundle_id="$id"
    (cd "$part" && sha256sum --quiet -c SHA256SUMS) || die "$part: a chunk does not match its sha256 (corrupted copy)"
    stage="$stage_root/$bundle_id"
    mkdir -p "$stage"
    for chunk in "$part"/bundle.tar.*; do
        cp "$chunk" "$stage/.$(basename "$chunk").tmp" && mv "$stage/.$(basename "$chunk").tmp" "$stage/$(basename "$chunk")"
    done
    cp "$part/BUNDLE.txt" "$stage/BUNDLE.txt"
    cat "$part/SHA256SUMS" "$stage/SHA256SUMS" 2>/dev/null | sort -u -k2 > "$stage/.sums.tmp" || true
    mv "$stage/.sums.tmp" "$stage/SHA256SUMS"
    echo "staged $(basename "$part") of bundle $bundle_id in $stage"
done

stage="$stage_root/$bundle_id"
want=$(field parts "$stage/BUNDLE.txt")
chunk_glob='bundle.tar.[0-9][0-9][0-9]'
have=$(find "$stage" -maxdepth 1 -name "$chunk_glob" | wc -l)
if [ "$have" -lt "$want" ]; then
    echo "have $have of $want parts of bundle $bundle_id; run again with the remaining part folder(s) and --stage $stage_root"
    exit 0
fi

# 2. reassemble and verify the whole
(cd "$stage" && sha256sum --quiet -c SHA256SUMS) || die "a staged chunk is corrupted; stage its part again"
tar_path="$stage/assembled.tar"
chunks=$(find "$stage" -maxdepth 1 -name "$chunk_glob" | sort)
cat $chunks > "$tar_path"
got=$(sha256sum "$tar_path" | cut -d' ' -f1)
[ "$got" = "$(field tar_sha256 "$stage/BUNDLE.txt")" ] || { rm -f "$tar_path"; die "reassembled tar has sha256 $got, not the bundle's"; }
rm -rf "$stage/extracted"
mkdir -p "$stage/extracted"
tar -xf "$tar_path" -C "$stage/extracted"
rm -f "$tar_path"
grep '^file=' "$stage/BUNDLE.txt" | cut -d= -f2- | (cd "$stage/extracted" && sha256sum --quiet -c -) \
    || die "an extracted file does not match its sha256"

# 3. install
shopt -s nullglob
wheels=("$stage"/extracted/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    mkdir -p "$target"
    "$python" -m pip install --quiet --no-index --no-deps --upgrade --target "$target" "${wheels[@]}"
    echo "installed ${#wheels[@]} wheels into $target"
fi
for gz in "$stage"/extracted/corpora/*.txt.gz; do
    mkdir -p "$corpora_dir"
    name=$(basename "$gz" .gz)
    gunzip -c "$gz" > "$corpora_dir/.$name.tmp" && mv "$corpora_dir/.$name.tmp" "$corpora_dir/$name"
    echo "corpus $name -> $corpora_dir"
done
if [ -d "$stage/extracted/model" ]; then
    mkdir -p "$models_dir"
    cp -r "$stage/extracted/model/." "$models_dir/"
    echo "model files -> $models_dir"
fi
echo "done. Use it with:  export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}"
