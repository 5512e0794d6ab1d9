#!/bin/bash
# A boot that fails says why: real QEMU boots of deliberately broken images (imported from
# the default one) end with the likely cause and the console's last lines; the SSH wait
# that failed carries its own time (-v), not teardown; a forced accelerator the host cannot
# run is named; a snapshot taken under another accelerator is refused by name.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset FIRECLAW_VMM FIRECLAW_ACCEL FIRECLAW_FIRECRACKER FIRECLAW_FAULT
shared=${FIRECLAW_STATE:?tests/run sets FIRECLAW_STATE}
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}bfl FIRECLAW_VMM=qemu
source "$FIRECLAW_TESTS/lib/leaks.sh"
source "$FIRECLAW_TESTS/lib/seed.sh" # private_state
if [ -n "${FIRECLAW_TEST_SKIP_VM:-}" ]; then
	echo "1..0 # skip FIRECLAW_TEST_SKIP_VM"
	exit 0
fi
private_state "$shared" "$tmp/state"
export FIRECLAW_STATE=$tmp/state
img=$FIRECLAW_STATE/images/default
import() { # import NAME [ARGS…]: an image from the default one's files
	local name=$1
	shift
	"$fc" -q image import --name "$name" --kernel "$img/vmlinux" --rootfs "$img/rootfs.ext4" \
		--host-key "$img/host_key.pub" "$@"
}

# ---- root= names a disk that is not there: the initramfs gives up, the VMM exits ----
# (its name carries an escape sequence, which the guest echoes on its console)
import noroot --initrd "$img/initrd" --boot-args "console=ttyS0 root=/dev/vdb$(printf '\033')[31m rw panic=1 pci=off fireclaw.rootwait=1"
err=$("$fc" run -v --image noroot -- true 2>&1)
is "$?" 1 "a guest that cannot find its root disk: exit 1"
like "$err" "^fireclaw: VM [0-9a-f]+: qemu exited .* before its SSH server answered; likely cause: the kernel cannot find or mount its root disk" \
	"the error names the likely cause"
like "$err" "the console says: fireclaw-initrd: root device /dev/vdb did not appear within 1 s" "and quotes the console line that shows it"
like "$err" "^the console ends with:$" "the console's last lines follow"
like "$err" "^  .*reboot" "(the guest's own lines)"
n=$(printf '%s\n' "$err" | sed -n '/^the console ends with:$/,$p' | grep -c '^  ')
ok "$([ "$n" -ge 3 ] && [ "$n" -le 8 ]; echo $?)" "3 to 8 console lines ($n)"
like "$err" "VM [0-9a-f]+: SSH wait \(failed\) [0-9.]+ ms" "-v: the failed wait is a stage of its own, with its time"
unlike "$err" $'\e' "no escape sequence from the guest's console reaches the terminal"
no_leaks "guest without its root disk"

# ---- no initramfs: the kernel has no virtio drivers and panics ----
import noinitrd --boot-args "console=ttyS0 root=/dev/vda rw panic=1 pci=off"
err=$("$fc" run --image noinitrd -- true 2>&1)
like "$err" "likely cause: the kernel cannot find or mount its root disk .*the console says: Kernel panic - not syncing: VFS: Unable to mount root fs" \
	"a kernel that cannot mount root: the cause and the panic line"
no_leaks "kernel panic"

# ---- a snapshot taken under TCG, and KVM forced ----
if [ ! -e /dev/kvm ]; then
	for i in 1 2 3 4 5 6; do skip "no /dev/kvm: KVM cannot be forced"; done
else
	# meta.json of a TCG snapshot of this image (its files are placeholders: it is never loaded)
	"$fc" -e '
		local snapshot, fs = require "fireclaw.snapshot", require "fireclaw.fs"
		local img = require("fireclaw.image").load("default")
		local d = require("fireclaw.vm").detect { vmm = "qemu", accel = "tcg" }
		local tmp = snapshot.begin("default")
		for _, f in ipairs({ "vmstate", "memory", "disk.ext4" }) do fs.write(tmp .. "/" .. f, "x") end
		snapshot.commit(tmp, "default", { image = "default", image_sha256 = snapshot.image_sha256(img),
			vmm = "qemu", vmm_version = d.qemu_version, vmm_info = { rng = true }, accel = "tcg", vcpu = 1,
			mem_mib = 256 })'
	out=$(FIRECLAW_ACCEL=tcg "$fc" -e 'local s, why = require("fireclaw.cli").use("restore").find {} print(s and "usable" or why)')
	is "$out" "usable" "the TCG snapshot is usable under TCG"
	err=$(FIRECLAW_ACCEL=kvm "$fc" restore 2>&1)
	is "$?:$(printf '%s\n' "$err" | wc -l)" "1:1" "restore with KVM forced: one line, exit 1"
	like "$err" "snapshot 'default' cannot be used: it was taken under tcg, this run forces kvm \(FIRECLAW_ACCEL=kvm\)" \
		"the accelerator is part of a snapshot's compatibility"
	# root: a confined QEMU refuses a /dev/kvm open to root only (tests/golden.sh), and this
	# case is about a guest that boots nowhere
	err=$(FIRECLAW_ACCEL=kvm FIRECLAW_VMM_USER=root "$fc" run -v --boot-timeout 3 -- true 2>&1)
	like "$err" "taken under tcg, this run forces kvm \(FIRECLAW_ACCEL=kvm\); cold booting" "run notes it and cold boots"
	if [ -d /sys/module/kvm_pvm ]; then
		# this host's KVM cannot run the guest: the SSH wait times out
		like "$err" "^fireclaw: (ssh: 172\.16\.0\.2:22 in .*: timed out after 3 s|agent: VM [0-9a-f]+ \(agent port 0\): the guest agent did not answer within 3 s).*; likely cause: KVM was forced \(FIRECLAW_ACCEL=kvm\), but this host's /dev/kvm is kvm_pvm" \
			"a forced KVM on kvm_pvm: the timeout names the cause"
		like "$err" "VM [0-9a-f]+: (SSH|agent) wait \(failed\) [0-9]{4}\.[0-9] ms" "-v: the timed-out wait carries its seconds"
	else
		skip "not a kvm_pvm host"
		skip "not a kvm_pvm host"
	fi
fi
no_leaks "the end"
done_testing
