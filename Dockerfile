# syntax=docker/dockerfile:1
# The capture image: istio-iptables (init container), capture-proxy (sidecar) and
# istio-capture-cni (CNI plugin + its node installer) on an empty base.
#
#   docker build -t capture .
#
# The final stage holds only what scripts/image-rootfs.sh assembles: the three binaries and the
# shared libraries `ldd` lists for them (istio-iptables is static and needs none; the others
# load libnftnl.so.11, libmnl.so.0, libc, libm, libgcc_s and the loader), plus /etc/passwd and
# /etc/group naming istio-proxy (1337). There is no shell and no iptables or nft userspace, so
# capture must use the native nftables backend: `istio-iptables --native-nftables ...` and the
# CNI plugin's "nativeNftables": true.
# tests/tests/image.rs builds the same directory with the same script and runs the binaries
# chrooted into it, without Docker.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnftnl-dev libmnl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/static-libs.sh \
 && scripts/build.sh istio-iptables capture-proxy istio-capture-cni \
 && scripts/image-rootfs.sh /rootfs target/release

FROM scratch
COPY --from=build /rootfs/ /
# The manifests under deploy/ name the binary to run; alone, the image explains itself.
CMD ["/istio-iptables", "--help"]
