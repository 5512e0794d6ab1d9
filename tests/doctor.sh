#!/bin/bash
# fireclaw doctor: runs, explains what backs /dev/kvm on this host (detected here the same
# way, not assumed), exits 0 when a VM can run, and non-zero for an impossible setup.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
FC=${FIRECLAW:-./fireclaw}
unset FIRECLAW_VMM FIRECLAW_ACCEL FIRECLAW_FIRECRACKER

out=$("$FC" doctor 2>&1)
rc=$?
for check in kvm firecracker qemu tun netns egress cgroup "confine qemu" "confine fc" image "state dir" "run dir" vm; do
	like "$out" "^(ok|warn|fail) +$check " "a line for the $check check"
done
like "$out" "^(ok|warn) +qemu +qemu [0-9.]+ at [^ ]+: microvm yes, seccomp sandbox (yes|no), restores (map|copy) the snapshot's memory" \
	"qemu: whether restores map the snapshot's memory (QEMU >= 8.2) or copy it"

# what backs /dev/kvm, found independently of fireclaw
if [ -d /sys/module/kvm_pvm ] && [ -r /dev/kvm ]; then
	like "$out" "^warn +kvm +.*kvm_pvm.*software nested hypervisor.*QEMU TCG \(slower\)" \
		"kvm_pvm is explained: guests run under QEMU TCG"
	like "$out" "fireclaw will use qemu with tcg" "and QEMU with TCG is chosen"
elif [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
	like "$out" "^ok +kvm +.*hardware virtualization" "hardware KVM is reported"
	skip "not a kvm_pvm host"
else
	like "$out" "^warn +kvm " "no usable KVM is a warning"
	skip "not a kvm_pvm host"
fi

if command -v qemu-system-x86_64 >/dev/null; then
	is "$rc" 0 "exit status 0: QEMU can run VMs here"
	like "$out" "^fireclaw can run VMs here" "the summary says so"
else
	skip "no QEMU on this host"
	skip "no QEMU on this host"
fi
unlike "$out" "^fail " "no check fails"

# how each VMM is confined (docs/security.md, "Least privilege")
if command -v qemu-system-x86_64 >/dev/null; then
	like "$out" "^(ok|warn) +confine qemu +QEMU as uid 0x70000000\+1\+<VM id>, gid 0x70000000, seccomp -sandbox (on|off), cgroup (v1|v2|none)" \
		"confine qemu: the VMM user scheme, seccomp and the cgroup version"
	like "$(FIRECLAW_VMM_USER=root "$FC" doctor 2>&1)" "^warn +confine qemu +QEMU as root \(FIRECLAW_VMM_USER=root\)" \
		"FIRECLAW_VMM_USER=root is a warning"
	if [ -c /dev/kvm ] && [ $((0$(stat -c %a /dev/kvm) & 066)) = 0 ]; then
		like "$(FIRECLAW_ACCEL=kvm "$FC" doctor 2>&1)" "^fail +confine qemu .*/dev/kvm is open to root only .*FIRECLAW_VMM_USER=root" \
			"KVM forced with a /dev/kvm open to root only: a confined QEMU cannot use it, and the fix"
	else
		skip "/dev/kvm is open to others or its group here"
	fi
else
	skip "no QEMU"; skip "no QEMU"; skip "no QEMU"
fi
like "$out" "^(ok|warn) +confine fc +jailer: (found|not found)" "confine fc: whether the jailer is there"

# the image line names the kernel the manifest records
release=$("$FC" -e 'local ok, m = pcall(require("fireclaw.image").info) io.write(ok and m.kernel_info and m.kernel_info.release or "")')
if [ -n "$release" ]; then
	like "$out" "^ok +image +'default' .*\(kernel ${release//./\\.}, built " "the image line shows the kernel release"
else
	skip "no default image built in $FIRECLAW_STATE"
fi
unlike "$out" "kernel \?" "no unknown kernel on the image line"

out=$(FIRECLAW_VMM=firecracker FIRECLAW_FIRECRACKER=/nonexistent "$FC" doctor 2>&1)
rc=$?
isnt() { [ "$1" != "$2" ]; ok $? "$3" "got: $1"; }
isnt "$rc" 0 "an impossible config (firecracker forced, binary missing) exits non-zero"
like "$out" "^fail +firecracker +FIRECLAW_FIRECRACKER=/nonexistent does not exist" \
	"it names the missing binary"
like "$out" "^ +fix: " "with a fix"
like "$out" "^fireclaw cannot run VMs here" "the summary says so"

out=$(FIRECLAW_VMM=firecracker FIRECLAW_FIRECRACKER="$FIRECLAW_TESTS/fake-firecracker" "$FC" doctor 2>&1)
like "$out" "^(ok|warn) +firecracker +firecracker 1\.16\.1 at .*fake-firecracker" \
	"a firecracker binary's version is reported (fake Firecracker)"

out=$(FIRECLAW_ACCEL=bogus "$FC" doctor 2>&1)
rc=$?
isnt "$rc" 0 "an unknown accelerator exits non-zero"
like "$out" "unknown accel 'bogus'" "and says why"

leftover=$(ip netns list 2>/dev/null | grep -c '^fct-doctor-' || true)
is "$leftover" 0 "no fct-doctor namespace left behind"
done_testing
