#!/bin/sh
# Installs, non-interactively and idempotently, every Debian package fireclaw needs to
# build, to run VMs, to build its guest image and to run its tests.
#   tools/deps.sh           install what is missing (root, or sudo)
#   tools/deps.sh --check   exit 1 and list what is missing, install nothing
# For tests only: FIRECLAW_DEPS_EXTRA (more package names), FIRECLAW_DEPS_APT_GET (the
# apt-get to run), FIRECLAW_DEPS_POLICY_RC (instead of /usr/sbin/policy-rc.d).
set -eu

BUILD="build-essential pkg-config libluajit2-5.1-dev luajit2 libcurl4-openssl-dev
libssh2-1-dev libssl-dev libjson-c-dev libext2fs-dev libmnl-dev libedit-dev
libnftables-dev"
RUN="qemu-system-x86 iproute2 e2fsprogs nftables libnftables1 libssh2-1 libext2fs2 dnsmasq-base"
IMAGE="busybox-static dropbear-bin openssh-client cpio lz4 xz-utils zstd mmdebstrap"
TEST="python3-yaml python3-jsonschema socat openssh-server hyperfine clang
libclang-rt-14-dev valgrind lua-check qemu-utils"

APT_GET=${FIRECLAW_DEPS_APT_GET:-apt-get}
POLICY=${FIRECLAW_DEPS_POLICY_RC:-/usr/sbin/policy-rc.d}

missing=""
for p in $BUILD $RUN $IMAGE $TEST ${FIRECLAW_DEPS_EXTRA:-}; do
	st=$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null || true)
	[ "$st" = installed ] || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "${1:-}" = "--check" ]; then
	echo "missing Debian packages:$missing" >&2
	exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
	command -v sudo >/dev/null || { echo "deps: need root to install:$missing" >&2; exit 1; }
	SUDO=sudo
fi
echo "deps: installing$missing" >&2
# never let a package start a service (sshd) on the host while we install it; the guard
# goes on every way out (a failed apt-get under set -e, Ctrl-C, SIGTERM), or the host
# would be left refusing to start any service
guard=""
unguard() { if [ -n "$guard" ]; then $SUDO rm -f "$POLICY"; guard=""; fi; }
trap unguard EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
if [ ! -e "$POLICY" ]; then
	guard=1
	printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
	$SUDO chmod 755 "$POLICY"
fi
export DEBIAN_FRONTEND=noninteractive
# the package lists may be missing or stale on a fresh machine
if ! $SUDO $APT_GET install -y -q --no-install-recommends $missing >/dev/null 2>&1; then
	$SUDO $APT_GET update -q >/dev/null
	$SUDO $APT_GET install -y -q --no-install-recommends $missing
fi
exit 0
