#!/usr/bin/env bash
# Put SageAttention's source at the pinned commit into .sage/ (ignored by git through .git/info/exclude), on
# this machine, so that a device call carries it to the GPU machine (run's `carry: [".sage"]`), where
# bench/build_sageattention.sh builds the wheel. About 0.5 MB: only what setup.py needs (it reads README.md).
#
#   bench/export_sageattention.sh [MIRROR]   MIRROR: a clone of github.com/thu-ml/SageAttention
#                                            (default /work/.mirror/thu-ml+SageAttention/repo, the fetch tool's)
set -euo pipefail
SAGE_COMMIT=d1a57a5  # keep in step with bench/build_sageattention.sh, which says why this commit
MIRROR=${1:-/work/.mirror/thu-ml+SageAttention/repo}
cd "$(dirname "$0")/.."
git -C "$MIRROR" cat-file -e "$SAGE_COMMIT^{commit}" || { echo "commit $SAGE_COMMIT is not in $MIRROR" >&2; exit 1; }
rm -rf .sage && mkdir .sage
# (git may warn about absent image blobs under assets/: they are not exported)
git -C "$MIRROR" archive "$SAGE_COMMIT" setup.py pyproject.toml MANIFEST.in LICENSE README.md csrc sageattention \
    | tar -x -C .sage
git -C "$MIRROR" rev-parse "$SAGE_COMMIT" > .sage/COMMIT
grep -qx '/.sage/' .git/info/exclude 2>/dev/null || echo '/.sage/' >> .git/info/exclude
echo "exported SageAttention $(cat .sage/COMMIT) into .sage/ ($(du -sh .sage | cut -f1))"
