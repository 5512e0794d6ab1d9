#!/bin/sh
# Installs, non-interactively and idempotently, every Debian package fireclaw needs to
# build, to run VMs, to build its guest image and to run its tests.
#   tools/deps.sh           install what is missing (root, or sudo)
#   tools/deps.sh --check   exit 1 and list what is missing, install nothing
set -eu

BUILD="build-essential pkg-config libluajit2-5.1-dev luajit2 libcurl4-openssl-dev
libssh2-1-dev libssl-dev libjson-c-dev libext2fs-dev libmnl-dev libedit-dev"
RUN="qemu-system-x86 iproute2 e2fsprogs nftables"
IMAGE="busybox-static dropbear-bin openssh-client cpio lz4 xz-utils zstd"
TEST="python3-yaml python3-jsonschema socat openssh-server hyperfine clang
libclang-rt-14-dev valgrind"

missing=""
for p in $BUILD $RUN $IMAGE $TEST; do
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
# never let a package start a service (sshd) on the host while we install it
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
	$SUDO chmod 755 /usr/sbin/policy-rc.d
	guard=1
fi
export DEBIAN_FRONTEND=noninteractive
# the package lists may be missing or stale on a fresh machine
if ! $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1; then
	$SUDO apt-get update -q >/dev/null
	$SUDO apt-get install -y -q --no-install-recommends $missing
fi
[ -n "$guard" ] && $SUDO rm -f /usr/sbin/policy-rc.d
exit 0
