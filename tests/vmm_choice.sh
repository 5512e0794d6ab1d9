#!/bin/bash
# Which VMM a run uses: one rule everywhere (run, coldboot, restore, snapshot create, doctor):
# the --vmm flag, then FIRECLAW_VMM, then config.vmm, then auto. An impossible choice is one
# line naming it and the fix, before any VM exists. And Firecracker older than 1.8 (the fake
# one playing v1.0.0) is refused at once for an image whose kernel finds its devices through
# ACPI, allowed for one imported with --cmdline-devices.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset FIRECLAW_VMM FIRECLAW_ACCEL FIRECLAW_FIRECRACKER FIRECLAW_FAULT
shared=${FIRECLAW_STATE:?tests/run sets FIRECLAW_STATE}
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}vmc
source "$FIRECLAW_TESTS/lib/leaks.sh"
source "$FIRECLAW_TESTS/lib/seed.sh" # private_state
# a private state: the suite's default image and keys (linked), room for an imported image
private_state "$shared" "$tmp/state"
export FIRECLAW_STATE=$tmp/state
img=$FIRECLAW_STATE/images/default
missing=$tmp/no-such-firecracker
nofc=(env FIRECLAW_VMM=firecracker FIRECLAW_FIRECRACKER=$missing)

# ---- an impossible choice: one line, exit 1, nothing started ----
for recipe in "run -- true" "coldboot" "restore" "snapshot create"; do
	# shellcheck disable=SC2086 # the recipe's words
	err=$("${nofc[@]}" "$fc" $recipe 2>&1)
	rc=$?
	is "$rc:$(printf '%s\n' "$err" | wc -l)" "1:1" "$recipe: FIRECLAW_VMM=firecracker without a binary is one line, exit 1"
	like "$err" "^fireclaw: vm: cannot run a VM: FIRECLAW_VMM=firecracker, but FIRECLAW_FIRECRACKER=$missing does not exist \(.*--vmm qemu\)$" \
		"$recipe: it names the setting, the missing binary and the fixes"
done
unlike "$err" "uses nil" "no 'this run uses nil'"
err=$("$fc" run --vmm firecracker -- true 2>&1)
if command -v firecracker >/dev/null; then
	skip "a firecracker is on PATH"
else
	like "$err" "^fireclaw: vm: cannot run a VM: --vmm firecracker, but there is no firecracker on PATH" "--vmm firecracker without a binary: the flag is named"
fi
err=$(FIRECLAW_VMM=bogus "$fc" run -- true 2>&1)
like "$err" "unknown vmm 'bogus' \(FIRECLAW_VMM=bogus; use auto, firecracker or qemu\)" "an unknown FIRECLAW_VMM says where it came from"
err=$("$fc" run --vmm bogus -- true 2>&1)
is "$?" 2 "an unknown --vmm is a usage error"

# ---- precedence, read from the choice each run reports with -v (stopped right after) ----
choice() { # choice ARGS…: the "chosen:" line of a run stopped after its VM object exists
	FIRECLAW_FAULT=netns:error "$fc" run -v "$@" -- true 2>&1 | grep -m1 " chosen: "
}
like "$(FIRECLAW_VMM=firecracker FIRECLAW_FIRECRACKER=$missing choice --vmm qemu)" \
	"qemu with (tcg|kvm) chosen: qemu as asked \(--vmm qemu\)" "--vmm qemu wins over FIRECLAW_VMM=firecracker"
like "$(FIRECLAW_VMM=qemu choice)" "chosen: qemu as asked \(FIRECLAW_VMM=qemu\)" "FIRECLAW_VMM is honoured by run (no --vmm default overrides it)"
out=$(FIRECLAW_VMM=qemu FIRECLAW_FAULT=netns:error "$fc" coldboot -v 2>&1 | grep -m1 " chosen: ")
like "$out" "chosen: qemu as asked \(FIRECLAW_VMM=qemu\)" "and by coldboot"
out=$(FIRECLAW_VMM=firecracker FIRECLAW_FIRECRACKER=$missing choice --vmm auto)
like "$out" " chosen: " "--vmm auto wins over FIRECLAW_VMM=firecracker"
unlike "$out" "as asked" "and chooses by itself"
out=$("$fc" -e 'local c = require "fireclaw.config"; c.vmm = "qemu"
	print(require("fireclaw.vm").detect({ versions = false }).why)')
like "$out" "^qemu as asked \(config.vmm = qemu\)" "config.vmm applies when neither flag nor environment says"
out=$(FIRECLAW_VMM=qemu "$fc" -e 'local c = require "fireclaw.config"; c.vmm = "firecracker"
	print(require("fireclaw.vm").detect({ versions = false }).why)')
like "$out" "^qemu as asked \(FIRECLAW_VMM=qemu\)" "FIRECLAW_VMM wins over config.vmm"

# doctor makes the same choice
out=$(FIRECLAW_VMM=qemu "$fc" doctor 2>&1)
like "$out" "^ok +vm +fireclaw will use qemu with (tcg|kvm): qemu as asked \(FIRECLAW_VMM=qemu\)" "doctor: the same choice as run"
out=$("${nofc[@]}" "$fc" doctor 2>&1)
like "$out" "^fail +firecracker +FIRECLAW_FIRECRACKER=$missing does not exist, and FIRECLAW_VMM=firecracker needs it" \
	"doctor: the impossible choice fails the same way"

# ---- Firecracker < 1.8 and the image's kernel ----
printf '#!/bin/sh\nFAKE_FC_VERSION=1.0.0 exec %s/fake-firecracker "$@"\n' "$FIRECLAW_TESTS" >"$tmp/fc-1.0"
chmod 755 "$tmp/fc-1.0"
export FAKE_FC_LOG=$tmp/fc.log
# (no jailer here: the unjailed Firecracker, opted in; tests/jailer.lua covers the jailed one)
fc10=(env FIRECLAW_VMM=firecracker FIRECLAW_FIRECRACKER=$tmp/fc-1.0 FIRECLAW_UNSAFE_NO_JAILER=1)
err=$("${fc10[@]}" "$fc" run --no-snapshot -- true 2>&1)
rc=$?
is "$rc:$(printf '%s\n' "$err" | wc -l)" "1:1" "Firecracker 1.0 and the default image: one line, exit 1"
like "$err" "cannot boot: firecracker 1\.0\.0 lists devices only on the kernel command line \(ACPI from 1\.8 on\).*--cmdline-devices" \
	"it says why and what to do"
err=$("${fc10[@]}" "$fc" run -v --no-snapshot -- true 2>&1)
like "$err" "VMM boot \(firecracker, failed\)" "refused at the boot step (its stage says so)"
unlike "$err" "SSH wait" "at once: there was no wait for SSH"
unlike "$(cat "$FAKE_FC_LOG")" "InstanceStart" "the guest was never started"
no_leaks "refused boot"

# (--no-agent: the fake's guest prints no agent line; this is about the SSH wait)
"$fc" -q image import --name cmdline --kernel "$img/vmlinux" --initrd "$img/initrd" --rootfs "$img/rootfs.ext4" \
	--host-key "$img/host_key.pub" --cmdline-devices --no-agent
like "$(cat "$FIRECLAW_STATE/images/cmdline/manifest.json")" '"cmdline_devices": true' "image import --cmdline-devices is in the manifest"
: >"$FAKE_FC_LOG"
err=$("${fc10[@]}" "$fc" run --no-snapshot --image cmdline --boot-timeout 1 -- true 2>&1)
like "$err" "^fireclaw: ssh: 172\.16\.0\.2:22 in .*: timed out" "an image marked cmdline-devices boots on Firecracker 1.0 (the fake's guest never answers)"
like "$(cat "$FAKE_FC_LOG")" "InstanceStart" "the guest was started"
no_leaks "cmdline-devices boot"

# doctor on old Firecrackers
out=$("${fc10[@]}" "$fc" doctor 2>&1)
like "$out" "^fail +firecracker +firecracker 1\.0\.0 lists devices only on the kernel command line.*cannot boot the 'default' image \(FIRECLAW_VMM=firecracker\)" \
	"doctor: Firecracker 1.0 forced with the default image fails"
like "$out" "^fail +vm +fireclaw would use firecracker" "and no VM can run"
out=$(FIRECLAW_FIRECRACKER=$tmp/fc-1.0 "$fc" doctor 2>&1)
like "$out" "^warn +firecracker +firecracker 1\.0\.0 .*cannot boot the 'default' image" "not forced: a warning"
printf '#!/bin/sh\nFAKE_FC_VERSION=1.12.0 exec %s/fake-firecracker "$@"\n' "$FIRECLAW_TESTS" >"$tmp/fc-1.12"
chmod 755 "$tmp/fc-1.12"
out=$(FIRECLAW_FIRECRACKER=$tmp/fc-1.12 "$fc" doctor 2>&1)
like "$out" "^warn +firecracker +firecracker 1\.12\.0 is older than 1\.16\.1, which fixes clones" "doctor warns below 1.16.1"
out=$(FIRECLAW_FIRECRACKER=$FIRECLAW_TESTS/fake-firecracker "$fc" doctor 2>&1)
unlike "$out" "older than|cannot boot the" "and not at 1.16.1"

# auto never picks a Firecracker that cannot boot the image (host KVM taken as hardware)
out=$("$fc" -e 'local vm = require "fireclaw.vm"
	local d = { kvm = "hardware", kvm_why = "hw", firecracker = "/x/firecracker", firecracker_version = "1.0.0", qemu = "/q",
		jailer = "/x/jailer" }
	print(vm.choose_vmm("auto", "auto", d))
	d.cmdline_devices = true
	print(vm.choose_vmm("auto", "auto", d))
	d.cmdline_devices, d.firecracker_version = nil, "1.16.1"
	print(vm.choose_vmm("auto", "auto", d))')
like "$(sed -n 1p <<<"$out")" "^qemu	firecracker 1\.0\.0 lists devices only" "auto: Firecracker 1.0 with an ACPI kernel → QEMU"
like "$(sed -n 2p <<<"$out")" "^firecracker	firecracker 1\.0\.0 found" "auto: Firecracker 1.0 with a cmdline-devices kernel → Firecracker"
like "$(sed -n 3p <<<"$out")" "^firecracker	firecracker 1\.16\.1 found" "auto: Firecracker 1.16.1 → Firecracker"
no_leaks "the end"
done_testing
