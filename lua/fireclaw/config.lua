-- fireclaw.config: where things live and the defaults a VM gets.
-- Environment overrides: FIRECLAW_STATE, FIRECLAW_RUN, FIRECLAW_VMM, FIRECLAW_ACCEL,
-- FIRECLAW_FIRECRACKER, FIRECLAW_JAILER, FIRECLAW_UNSAFE_NO_JAILER, FIRECLAW_QEMU, FIRECLAW_NETNS_PREFIX, FIRECLAW_VMM_USER,
-- FIRECLAW_LOG_CAP, FIRECLAW_UPLINK_NETNS, FIRECLAW_DNS, FIRECLAW_NET.
local M = {}

M.state_dir = os.getenv("FIRECLAW_STATE") or "/var/lib/fireclaw"
M.run_dir = os.getenv("FIRECLAW_RUN") or "/run/fireclaw"
-- VM namespaces are <prefix><id>; tests use their own prefix to tell their VMs apart
M.netns_prefix = os.getenv("FIRECLAW_NETNS_PREFIX") or "fc-"

-- VM defaults
M.vcpu = 1
M.mem_mib = 256
M.image = "default"
-- The VMM and QEMU's accelerator. Never read these two directly: M.choice says what a run
-- uses, with one rule everywhere (recipes, vm.detect, doctor): a flag (--vmm) wins, then
-- the environment (FIRECLAW_VMM, FIRECLAW_ACCEL), then what a script set here, then auto.
M.vmm = "auto"   -- auto | firecracker | qemu
M.accel = "auto" -- auto | kvm | tcg (QEMU)
M.firecracker = os.getenv("FIRECLAW_FIRECRACKER") -- path to the binary, else PATH
M.qemu = os.getenv("FIRECLAW_QEMU") or "qemu-system-x86_64"
-- Firecracker's jailer (path or name; else `jailer` beside firecracker, else on PATH). Without
-- one, Firecracker is refused as root unless unsafe_no_jailer (--unsafe-no-jailer).
M.jailer = os.getenv("FIRECLAW_JAILER")
M.unsafe_no_jailer = os.getenv("FIRECLAW_UNSAFE_NO_JAILER") == "1"
-- who QEMU runs as: "auto" (a uid of its own per VM, see fireclaw.vmm.qemu), "root", "UID:GID"
M.vmm_user = os.getenv("FIRECLAW_VMM_USER") or "auto"
-- how commands and files reach the guest: "agent" (fireclaw's guest agent on a private
-- VMM channel), "ssh", or "auto" (the agent when the image or snapshot has it, else SSH)
M.exec = os.getenv("FIRECLAW_EXEC") or "auto"
-- bytes each console or VMM log in a VM's directory may hold: the first half of what the
-- guest and the VMM wrote and the most recent rest (proc.spawn's {log = path})
-- (not a number: -1, which the VM's start refuses with a message naming the variable)
M.log_cap = os.getenv("FIRECLAW_LOG_CAP") and (tonumber(os.getenv("FIRECLAW_LOG_CAP")) or -1) or 1048576

-- The network every VM gets inside its own namespace fc-<id> (docs/design.md, "The network of a VM").
M.net = {
	tap = "tap0",
	host_ip = "172.16.0.1",
	guest_ip = "172.16.0.2",
	prefix = 30,
	netmask = "255.255.255.252",
	-- fixed MACs: a restored guest still has the gateway's MAC in its ARP cache
	tap_mac = "06:00:ac:10:00:01",
	guest_mac = "06:00:ac:10:00:02",
	-- egress (fireclaw.netpolicy): the namespace the VMs' veths go to (nil: fireclaw's
	-- own, normally the host's) and the resolvers their dnsmasq asks (nil: the host's
	-- /etc/resolv.conf); the tests point both at namespaces of their own
	uplink_netns = os.getenv("FIRECLAW_UPLINK_NETNS") ~= "" and os.getenv("FIRECLAW_UPLINK_NETNS") or nil,
	dns = os.getenv("FIRECLAW_DNS"),
	-- the default mode of a VM's network: "none" (no way out) or "nat"; nil: the image's
	-- (manifest net_mode, set by `image import --net`), else "none". `--net` and
	-- sb:network{mode} choose per VM
	mode = os.getenv("FIRECLAW_NET") ~= "" and os.getenv("FIRECLAW_NET") or nil,
}

local CHOICE_ENV = { vmm = "FIRECLAW_VMM", accel = "FIRECLAW_ACCEL" }

-- What a run uses for `name` ("vmm" or "accel") given the flag's value (nil: not given):
-- the value and where it came from, for messages ("--vmm firecracker",
-- "FIRECLAW_ACCEL=kvm", "config.vmm = qemu"; "auto" when nothing chose).
function M.choice(name, flag)
	local env = CHOICE_ENV[name]
	if not env then error("config.choice: no choice named '" .. tostring(name) .. "'", 2) end
	if flag ~= nil and flag ~= "" then return flag, "--" .. name .. " " .. flag end
	local v = os.getenv(env)
	if v and v ~= "" then return v, env .. "=" .. v end
	v = M[name]
	if v ~= nil and v ~= "auto" then return v, "config." .. name .. " = " .. tostring(v) end
	return "auto", "auto"
end

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
