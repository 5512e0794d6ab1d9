-- fireclaw.guest: the files that run inside the guest, as Lua strings (only .lua files are
-- embedded in the binary). fireclaw.image writes them into the initramfs and the rootfs.
--
--   guest.READY          the console line the guest prints once sshd listens
--   guest.init()                -> /init of the initramfs: its bytes (guest/fireclaw-init.c,
--                                  compiled into fireclaw; it loads the modules listed in
--                                  /lib/modules/order, mounts the root, sets up the network,
--                                  starts the agent and execs the image's init)
--   guest.rootfs_files(opts)    -> list of {path =, mode =, content =} for the rootfs
--                                  (opts.hostname, opts.authorized_keys)
--   guest.HELPER                 where the rootfs has the helper (/usr/sbin/fireclaw-guest)
--   guest.helper()               -> its bytes (guest/fireclaw-guest.c, compiled into fireclaw)
--   guest.reseed_command(ns [, dns]) -> the shell line that reseeds the guest's CRNG with host
--                                  entropy on its stdin and sets its clock to ns (and with
--                                  dns, writes /etc/resolv.conf)
--   guest.AGENT                  where the rootfs has the agent (/usr/sbin/fireclaw-agent)
--   guest.agent()                -> its bytes (guest/fireclaw-agent.c; docs/agent-protocol.md)
--   guest.AGENT_PORTS            how many agent ports (virtio-serial) a QEMU VM gets
--   guest.programs()             -> list of {path =, mode =, content =}: fireclaw's own
--                                  programs, written into every image at these paths (the
--                                  helper; one more entry per guest program)
--   guest.BOX                    /.fireclaw: the self-contained guest side written into
--                                  images whose userland is not fireclaw's (--base debian,
--                                  import --oci): busybox, dropbear + its libraries and
--                                  loader, sftp-server, the host key, and guest.box_init()
--                                  as the init (init=/.fireclaw/init)
--
-- Kernel command line understood by the guest (the kernel has no IP autoconfig):
--   root=/dev/vda rootfstype=ext4 rootflags=… ro|rw init=/sbin/init
--   ip=GUEST:SERVER:GATEWAY:NETMASK:HOSTNAME:DEVICE:off[:DNS0[:DNS1]]
--   fireclaw.rootwait=SECONDS   how long the initramfs waits for the root disk (10)
--   fireclaw.gw_mac=MAC         permanent neighbour entry for the gateway (no ARP)
--   fireclaw.hostname=NAME      hostname (else the ip= field, else /etc/hostname)
--   fireclaw.debug              progress lines from the initramfs, sshd logs on the console
local core = require "fireclaw.core.guest"

local M = {}

M.READY = "fireclaw: guest ready"

-- Bump when the guest side changes in a way that needs a rebuilt image.
-- 2: /usr/sbin/fireclaw-guest (reseed + clock) replaces the fireclaw-clock script
-- 3: /usr/sbin/fireclaw-agent, started by rcS before sshd; virtio_console in the initramfs
-- 4: the initramfs's /init is guest/fireclaw-init (C): it sets up the network, mounts and
--    starts the agent; rcS and the box's init only start sshd
-- 5: the initramfs loads only the drivers of the virtio devices present (no vsock under QEMU)
M.VERSION = 5

M.init = core.init
M.HELPER = "/usr/sbin/fireclaw-guest"
M.helper = core.helper
M.AGENT = "/usr/sbin/fireclaw-agent"
M.agent = core.agent
-- several ports, each on its own host socket: a QEMU chardev socket takes one client at a
-- time, and several fireclaw processes may exec in one kept VM at once (docs/DECISIONS.md)
M.AGENT_PORTS = 4
-- bytes of host entropy per reseed (the helper takes 32..4096)
M.RESEED_BYTES = 64

-- One exec does both: credit the host's bytes (stdin) and reseed the CRNG, then set the
-- clock to ns (an integer, nanoseconds since 1970).
-- dns (an IPv4 address, optional): also make it the guest's resolver, in the same exec (a
-- restored guest keeps the snapshot's /etc/resolv.conf otherwise).
function M.reseed_command(ns, dns)
	if type(ns) ~= "number" or ns < 0 or ns % 1 ~= 0 then error("guest: reseed_command wants integer ns", 2) end
	local line = string.format("%s reseed %.0f", M.HELPER, ns)
	if dns == nil then return line end
	if type(dns) ~= "string" or not dns:match("^%d+%.%d+%.%d+%.%d+$") then error("guest: reseed_command: bad dns", 2) end
	return line .. string.format(" && echo 'nameserver %s' >/etc/resolv.conf", dns)
end

-- fireclaw's own programs in the guest, at these paths in every image (the default one,
-- --base debian and imported OCI images alike).
function M.programs()
	return { { path = M.HELPER:sub(2), mode = "755", content = M.helper() },
		-- the guest agent (static: it needs nothing of the image's userland), started by the
		-- image's init before sshd
		{ path = M.AGENT:sub(2), mode = "755", content = M.agent() } }
end

M.BOX = "/.fireclaw"

local INITTAB = [=[
# fireclaw guest: busybox init. rcS brings the system up and starts sshd (dropbear);
# init then only reaps orphans. `poweroff` / `reboot` run rcK first; `poweroff -f` /
# `reboot -f` stop at once (with QEMU use -no-reboot so a reboot ends the VM).
::sysinit:/etc/init.d/rcS
::shutdown:/etc/init.d/rcK
::ctrlaltdel:/sbin/poweroff
]=]

-- fireclaw.debug on the kernel command line: progress lines with the uptime, sshd's logs
local DEBUG = [=[
debug=
read -r cmdline </proc/cmdline
case " $cmdline " in *" fireclaw.debug "*) debug=1 ;; esac
]=]

-- ready = something listens on TCP port 22 (0x0016), IPv4 or IPv6: then the readiness line
local READY_WAIT = [=[
n=500
until grep -qE ':0016 0+:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
	n=$((n - 1))
	if [ "$n" -le 0 ]; then
		say "dropbear is not listening on port 22"
		break
	fi
	usleep 10000
done
echo "@READY@"]=]

-- the shared fragments of the two inits
local function fill(text)
	return (text:gsub("@DEBUG@", function() return DEBUG end)
		:gsub("@READY_WAIT@", function() return READY_WAIT end):gsub("@READY@", M.READY))
end

local RCS = [=[
#!/bin/sh
# fireclaw guest: start dropbear (run once by busybox init), then print the readiness line
# on the console. The initramfs's /init (fireclaw-init) has mounted /proc, /sys, /dev,
# /dev/pts, /dev/shm, /run and fstab's tmpfs, set the network and hostname and started the
# agent already. Generated by fireclaw (lua/fireclaw/guest.lua).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "fireclaw: $*"; }
trace() { # fireclaw.debug: progress with the uptime
	[ -n "$debug" ] || return 0
	read -r up _ </proc/uptime
	echo "[$up] fireclaw: $*"
}

@DEBUG@
# sshd: keys only (-s), the host key made at image build time (pinned by the host)
if [ -n "$debug" ]; then
	dropbear -s -E -p 22 -P /run/dropbear.pid -r /etc/dropbear/dropbear_ed25519_host_key
else
	dropbear -s -p 22 -P /run/dropbear.pid -r /etc/dropbear/dropbear_ed25519_host_key 2>/dev/null
fi || say "dropbear failed to start"
trace "dropbear started"
@READY_WAIT@
]=]

local RCK = [=[
#!/bin/sh
# fireclaw guest: shutdown (busybox init runs this on poweroff/reboot before killing all)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ -f /run/dropbear.pid ] && kill "$(cat /run/dropbear.pid)" 2>/dev/null
sync
mount -o remount,ro / 2>/dev/null
exit 0
]=]

-- mounted by the initramfs's /init (fireclaw-init: the pseudo filesystems, and the tmpfs
-- entries of this file), not by `mount -a`
local FSTAB = [=[
# fireclaw guest
devpts   /dev/pts  devpts  gid=5,mode=0620,ptmxmode=0666  0 0
tmpfs    /dev/shm  tmpfs   mode=1777,nosuid,nodev         0 0
tmpfs    /tmp      tmpfs   mode=1777,nosuid,nodev         0 0
tmpfs    /run      tmpfs   mode=0755,nosuid,nodev         0 0
]=]

local PROFILE = [=[
# fireclaw guest: login shells
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=${HOME:-/root}
PS1='\h:\w\$ '
]=]

local function rcs()
	return fill(RCS)
end

-- The rootfs files written by fireclaw (everything else comes from Debian packages).
function M.rootfs_files(opts)
	opts = opts or {}
	local host = opts.hostname or "fireclaw"
	return {
		{ path = "etc/inittab", mode = "644", content = INITTAB },
		{ path = "etc/init.d/rcS", mode = "755", content = rcs() },
		{ path = "etc/init.d/rcK", mode = "755", content = RCK },
		{ path = "etc/profile", mode = "644", content = PROFILE },
		{ path = "etc/hostname", mode = "644", content = host .. "\n" },
		{ path = "etc/hosts", mode = "644",
			content = "127.0.0.1\tlocalhost\n127.0.1.1\t" .. host .. "\n::1\tlocalhost ip6-localhost ip6-loopback\n" },
		{ path = "etc/passwd", mode = "644",
			content = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n" },
		-- '*': no password, but not locked ('!' makes dropbear refuse key logins too)
		{ path = "etc/shadow", mode = "600", content = "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n" },
		{ path = "etc/group", mode = "644", content = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n" },
		{ path = "etc/shells", mode = "644", content = "/bin/sh\n/bin/ash\n/usr/bin/sh\n/usr/bin/ash\n" },
		{ path = "etc/nsswitch.conf", mode = "644",
			content = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n" },
		{ path = "etc/ld.so.conf", mode = "644", content = "include /etc/ld.so.conf.d/*.conf\n" },
		{ path = "etc/resolv.conf", mode = "644", content = "" },
		{ path = "etc/fstab", mode = "644", content = FSTAB },
		{ path = "root/.ssh/authorized_keys", mode = "600", content = opts.authorized_keys or "" },
	}
end

local BOX_INIT = [=[
#!/.fireclaw/bin/sh
# fireclaw's init for an image whose userland is not fireclaw's (--base debian, an imported
# OCI image): everything it runs is in /.fireclaw (busybox, dropbear and its libraries with
# their own loader), so it works without the image's shell or libc. The initramfs's /init
# (fireclaw-init) has mounted the kernel filesystems, set up the network and started the
# agent; this starts dropbear, prints the readiness line, and then stays PID 1, reaping
# orphans. Generated by fireclaw (lua/fireclaw/guest.lua).
export PATH=/.fireclaw/bin
B=/.fireclaw
say() { echo "fireclaw: $*"; }
trace() {
	[ -n "$debug" ] || return 0
	read -r up _ </proc/uptime
	echo "[$up] fireclaw: $*"
}
exec </dev/console >/dev/console 2>&1
@DEBUG@
# sshd: keys only (-s), the host key made at image build time (pinned by the host); run by
# its own loader and libraries, whatever libc the image has (or none). A relative argv[0]:
# dropbear re-executes its absolute argv[0] for every connection, which would load it with
# the image's loader and libraries (missing, or another libc)
set -- $B/lib/@LOADER@ --library-path $B/lib --argv0 dropbear $B/sbin/dropbear -s -p 22 -P /run/dropbear.pid \
	-r $B/etc/dropbear_ed25519_host_key
if [ -n "$debug" ]; then "$@" -E; else "$@" 2>/dev/null; fi || say "dropbear failed to start"
@READY_WAIT@
# PID 1 from here on: busybox poweroff/reboot/halt signal it (USR2/TERM/USR1); every wait
# reaps whatever child exits, orphans included
trap 'sync; poweroff -f' USR2
trap 'sync; reboot -f' TERM INT
trap 'sync; halt -f' USR1
while :; do
	sleep 3600 &
	wait
done
]=]

-- /.fireclaw/init of an image with fireclaw's box (loader: the file name of the ELF
-- interpreter copied into /.fireclaw/lib, e.g. ld-linux-x86-64.so.2).
function M.box_init(loader)
	if type(loader) ~= "string" or not loader:match("^[%w._-]+$") then error("guest: box_init wants a loader file name", 2) end
	return (fill(BOX_INIT):gsub("@LOADER@", loader))
end

-- Directories of the rootfs and their modes (created before the files).
M.rootfs_dirs = {
	{ "dev", "755" }, { "proc", "555" }, { "sys", "555" }, { "run", "755" }, { "tmp", "1777" },
	{ "etc", "755" }, { "etc/init.d", "755" }, { "etc/dropbear", "755" }, { "etc/ld.so.conf.d", "755" },
	{ "root", "700" }, { "root/.ssh", "700" }, { "var", "755" }, { "var/log", "755" },
	{ "var/tmp", "1777" }, { "home", "755" }, { "mnt", "755" }, { "usr/local/bin", "755" },
}

-- An image imported with --kernel/--rootfs keeps its own init and userland: fireclaw only
-- writes the agent at BOX_AGENT and boots it as init= (its init shim, as PID 1, starts the
-- agent and execs the image's own init: fireclaw.init= on the command line, else the
-- kernel's list). The agent then prints AGENT_CHANNELS .. " ports=N vsock=0|1" on the
-- console: the host's cue to use it, or SSH when the image's kernel gave it no channel.
M.BOX_AGENT = M.BOX .. "/bin/fireclaw-agent"
M.AGENT_CHANNELS = "fireclaw-agent: channels:"

return M
