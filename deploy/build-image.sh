#!/usr/bin/env bash
# Builds the image `flatnet:0.1.0` (or the tag given) with podman from deploy/Containerfile.
# Then push it to your registry, or load it on the nodes (`podman save | ctr -n k8s.io images
# import -`), and `kubectl apply -f deploy/`.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-flatnet:0.1.0}
cargo build --release
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp target/x86_64-unknown-linux-gnu/release/flatnet "$ctx/flatnet"
nft=$(command -v nft)
mkdir -p "$ctx/rootfs/usr/sbin"
cp "$nft" "$ctx/rootfs/usr/sbin/nft"
for lib in $(ldd "$nft" | awk '/=>/ {print $3} /^\t\// {print $1}'); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cp deploy/Containerfile "$ctx/Containerfile"
podman build -f "$ctx/Containerfile" -t "$tag" "$ctx"
