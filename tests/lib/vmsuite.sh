# vmsuite.sh: the start of a test suite that boots VMs:
#   source "$FIRECLAW_TESTS/lib/vmsuite.sh" NAME     (NAME: a few letters, the suite's own)
# set -u; tap.sh and leaks.sh sourced; fc=$FIRECLAW; tmp: a new directory, removed on exit
# (a suite that sets its own EXIT trap removes it there); QEMU; FIRECLAW_RUN=$tmp/run and
# FIRECLAW_NETNS_PREFIX=fc-<test tag>NAME, so that the suite's VMs and namespaces are its
# own (the leak checks look at those only).
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export FIRECLAW_VMM=qemu
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}$1
