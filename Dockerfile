# syntax=docker/dockerfile:1
# Two images, on an empty base:
#
#   docker build -t capture-iptables:0.1.0 .                  # the last stage: for Istio's default (iptables) mode
#   docker build --target capture -t capture:0.1.0 .          # the minimal one: native nftables only
#
# (podman build the same.) Both hold istio-iptables (the init container), capture-proxy (the
# sidecar) and istio-capture-cni (CNI plugin and its node installer) in /usr/local/bin, exactly
# the shared libraries they load, and /etc/passwd and /etc/group naming istio-proxy (1337); the
# iptables image adds iptables and ip6tables (nft and legacy variants) with exactly the libraries
# and xtables extensions they load. Neither has a shell or a package manager. What goes in is
# scripts/image-rootfs.sh's, and why.
#
# The entrypoint is istio-iptables, so the container Istio's injector writes (no command, args
# `istio-iptables -p 15001 ...`, as for its own image whose entrypoint is pilot-agent) runs
# unchanged. Other programs: `command: [/usr/local/bin/capture-proxy]` and so on.
#
# scripts/image-build.sh builds the same two images without a registry: it assembles the image
# directories from target/release with the same script and builds the stages below from them.

FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnftnl-dev libmnl-dev pkg-config iptables \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/static-libs.sh \
 && scripts/build.sh istio-iptables capture-proxy istio-capture-cni \
 && scripts/image-rootfs.sh /image/minimal target/release \
 && scripts/image-rootfs.sh --iptables /image/iptables target/release

# From here to the end, scripts/image-build.sh builds the stages offline, with `COPY --from=build
# /image/` read as its own directories.
FROM scratch AS capture
COPY --from=build /image/minimal/ /
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/usr/local/bin/istio-iptables"]
CMD ["--help"]

FROM capture AS capture-iptables
COPY --from=build /image/iptables/ /
