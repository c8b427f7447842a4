#!/usr/bin/env bash
# Builds both images from the release binaries without a registry: `capture:TAG` (minimal, native
# nftables) and `capture-iptables:TAG` (plus iptables). The image directories come from
# scripts/image-rootfs.sh, as in the Dockerfile's build stage, and the images from the
# Dockerfile's own final stages (everything from `FROM scratch AS capture` on), whose
# `COPY --from=build /image/...` then reads those directories. Needs the release binaries
# (scripts/build.sh), iptables installed (its binaries and extensions are copied) and podman or
# docker (ENGINE=...).
#
# Usage: scripts/image-build.sh [TAG] [RELEASE_DIR]   (TAG defaults to 0.1.0, RELEASE_DIR to target/release)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-0.1.0}
release=${2:-$root/target/release}
engine=${ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$engine" ] || { echo "image-build: neither podman nor docker found (set ENGINE)" >&2; exit 1; }

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
"$root/scripts/image-rootfs.sh" "$context/image/minimal" "$release"
"$root/scripts/image-rootfs.sh" --iptables "$context/image/iptables" "$release"
sed -n '/^FROM scratch AS capture$/,$p' "$root/Dockerfile" | sed 's#^COPY --from=build /image/#COPY image/#' \
  >"$context/Containerfile"
if ! grep -q '^FROM scratch AS capture$' "$context/Containerfile" || grep -q -- '--from=build' "$context/Containerfile"; then
  echo "image-build: the Dockerfile's final stages are not the ones this script reads" >&2
  exit 1
fi
for image in capture capture-iptables; do
  "$engine" build --quiet --target "$image" --tag "$image:$tag" --file "$context/Containerfile" "$context" >/dev/null
  echo "$image:$tag"
done
