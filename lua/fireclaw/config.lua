-- fireclaw.config: where things live and the defaults a VM gets.
-- Environment overrides: FIRECLAW_STATE, FIRECLAW_RUN, FIRECLAW_VMM, FIRECLAW_ACCEL,
-- FIRECLAW_FIRECRACKER, FIRECLAW_QEMU, FIRECLAW_NETNS_PREFIX, FIRECLAW_VMM_USER,
-- FIRECLAW_LOG_CAP.
local M = {}

M.state_dir = os.getenv("FIRECLAW_STATE") or "/var/lib/fireclaw"
M.run_dir = os.getenv("FIRECLAW_RUN") or "/run/fireclaw"
-- VM namespaces are <prefix><id>; tests use their own prefix to tell their VMs apart
M.netns_prefix = os.getenv("FIRECLAW_NETNS_PREFIX") or "fc-"

-- VM defaults
M.vcpu = 1
M.mem_mib = 256
M.image = "default"
M.vmm = os.getenv("FIRECLAW_VMM") or "auto"     -- auto | firecracker | qemu
M.accel = os.getenv("FIRECLAW_ACCEL") or "auto" -- auto | kvm | tcg (QEMU)
M.firecracker = os.getenv("FIRECLAW_FIRECRACKER") -- path to the binary, else PATH
M.qemu = os.getenv("FIRECLAW_QEMU") or "qemu-system-x86_64"
-- who QEMU runs as: "auto" (a uid of its own per VM, see fireclaw.vmm.qemu), "root", "UID:GID"
M.vmm_user = os.getenv("FIRECLAW_VMM_USER") or "auto"
-- bytes each console or VMM log in a VM's directory may hold: the first half of what the
-- guest and the VMM wrote and the most recent rest (proc.spawn's {log = path})
-- (not a number: -1, which the VM's start refuses with a message naming the variable)
M.log_cap = os.getenv("FIRECLAW_LOG_CAP") and (tonumber(os.getenv("FIRECLAW_LOG_CAP")) or -1) or 1048576

-- The network every VM gets inside its own namespace fc-<id> (see DESIGN.md).
M.net = {
	tap = "tap0",
	host_ip = "172.16.0.1",
	guest_ip = "172.16.0.2",
	prefix = 30,
	netmask = "255.255.255.252",
	-- fixed MACs: a restored guest still has the gateway's MAC in its ARP cache
	tap_mac = "06:00:ac:10:00:01",
	guest_mac = "06:00:ac:10:00:02",
}

function M.image_dir(name)
	return M.state_dir .. "/images/" .. (name or M.image)
end

function M.snapshot_dir(name)
	return M.state_dir .. "/snapshots/" .. (name or M.image)
end

function M.vm_dir(id)
	return M.run_dir .. "/vms/" .. id
end

return M
