#!/usr/bin/env bash
# Fetch the offline data sets of ibnorm.lab.experiments into <repo>/.data, from Debian packages.
#
#   dataset-fashion-mnist -> .data/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#   r-cran-janeaustenr    -> .data/janeaustenr/ (the R package folder; data/Rdata.rdb holds the novels)
#
# Only `apt-get download` and `dpkg -x` are used: nothing is installed, root is not needed
# (R is not needed either). The .deb files are kept in .data/debs/. Safe to re-run: a data
# set already extracted is skipped. MNIST-1D and the pydoc text need nothing from here.
# Usage: scripts/fetch_data.sh   (from anywhere; `make data` runs it)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/.data"
DEBS="$DATA/debs"

say() { printf 'fetch_data: %s\n' "$*"; }
die() { printf 'fetch_data: error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get dpkg; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        die "\`$tool\` is not available; this script needs a Debian/Ubuntu system with apt.
  Elsewhere, get the Fashion-MNIST idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
  t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into $DATA/fashion-mnist/ and the
  r-cran-janeaustenr package tree (with data/Rdata.rdb and data/Rdata.rdx) into $DATA/janeaustenr/,
  or point the loaders at them with data_dir=... / --data-dir or \$IBNORM_DATA_DIR."
    fi
done

APT_OPTS=(-q)
# As root, apt would otherwise try to download as the unprivileged _apt user, which cannot
# write into .data/debs, and print a warning; downloading as root directly is what it falls back to.
if [ "$(id -u)" -eq 0 ]; then
    APT_OPTS+=(-o APT::Sandbox::User=root)
fi

STAGING=""
cleanup() { if [ -n "$STAGING" ] && [ -d "$STAGING" ]; then rm -rf "$STAGING"; fi; }
trap cleanup EXIT

# Print the path of the newest downloaded .deb of package $1, or nothing.
find_deb() {
    local pkg="$1"
    ls -1t "$DEBS/${pkg}"_*.deb 2>/dev/null | head -n 1 || true
}

# Make sure a .deb of package $1 is in .data/debs; print its path.
download_deb() {
    local pkg="$1" deb
    deb="$(find_deb "$pkg")"
    if [ -n "$deb" ]; then
        say "$pkg: using $(basename "$deb") already in .data/debs" >&2
        printf '%s\n' "$deb"
        return
    fi
    mkdir -p "$DEBS"
    say "$pkg: apt-get download into .data/debs" >&2
    if ! (cd "$DEBS" && apt-get "${APT_OPTS[@]}" download "$pkg" >&2); then
        if [ "$(id -u)" -eq 0 ]; then
            say "$pkg: download failed; running apt-get update once and retrying" >&2
            apt-get -q update >&2 || true
            (cd "$DEBS" && apt-get "${APT_OPTS[@]}" download "$pkg" >&2) \
                || die "apt-get download $pkg failed even after apt-get update (is a Debian mirror reachable?)"
        else
            die "apt-get download $pkg failed. If apt says it cannot locate the package, its package lists are
  missing or stale: run \`sudo apt-get update\` once, then run this script again (it stays root-free)."
        fi
    fi
    deb="$(find_deb "$pkg")"
    [ -n "$deb" ] || die "apt-get download $pkg reported success but no ${pkg}_*.deb is in $DEBS"
    printf '%s\n' "$deb"
}

# Extract .deb $1 into a fresh staging folder under .data; sets STAGING.
extract_deb() {
    cleanup
    STAGING="$(mktemp -d "$DATA/.extract.XXXXXX")"
    dpkg -x "$1" "$STAGING"
}

# Move folder $1 to $2 as one rename, replacing whatever partial $2 was there.
install_dir() {
    local src="$1" dest="$2"
    rm -rf "$dest"
    mv "$src" "$dest"
}

fetch_fashion_mnist() {
    local dest="$DATA/fashion-mnist" deb src f
    local files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
    local have=1
    for f in "${files[@]}"; do [ -f "$dest/$f" ] || have=0; done
    if [ "$have" -eq 1 ]; then
        say "fashion-mnist: already in .data/fashion-mnist, skipped"
        return
    fi
    deb="$(download_deb dataset-fashion-mnist)"
    extract_deb "$deb"
    src="$STAGING/usr/share/datasets/fashion-mnist"
    for f in "${files[@]}"; do
        [ -f "$src/$f" ] || die "$(basename "$deb") has no usr/share/datasets/fashion-mnist/$f; delete it from .data/debs and re-run"
        gzip -t "$src/$f" || die "$(basename "$deb"): $f is not a valid gzip file; delete the .deb from .data/debs and re-run"
    done
    cp "$STAGING/usr/share/doc/dataset-fashion-mnist/copyright" "$src/copyright" 2>/dev/null || true
    install_dir "$src" "$dest"
    say "fashion-mnist: extracted $(basename "$deb") -> .data/fashion-mnist ($(du -sh "$dest" | cut -f1))"
}

fetch_janeaustenr() {
    local dest="$DATA/janeaustenr" deb src
    if [ -f "$dest/data/Rdata.rdb" ] && [ -f "$dest/data/Rdata.rdx" ]; then
        say "janeaustenr: already in .data/janeaustenr, skipped"
        return
    fi
    deb="$(download_deb r-cran-janeaustenr)"
    extract_deb "$deb"
    src="$STAGING/usr/lib/R/site-library/janeaustenr"
    [ -f "$src/data/Rdata.rdb" ] && [ -f "$src/data/Rdata.rdx" ] \
        || die "$(basename "$deb") has no usr/lib/R/site-library/janeaustenr/data/Rdata.{rdb,rdx}; delete it from .data/debs and re-run"
    cp "$STAGING/usr/share/doc/r-cran-janeaustenr/copyright" "$src/copyright" 2>/dev/null || true
    install_dir "$src" "$dest"
    say "janeaustenr: extracted $(basename "$deb") -> .data/janeaustenr ($(du -sh "$dest" | cut -f1))"
}

mkdir -p "$DATA"
fetch_fashion_mnist
fetch_janeaustenr
cleanup
STAGING=""
say "done: data in $DATA"
