-- ssh_server.lua: real SSH servers for tests, inside a test network namespace.
--
--   local server = require "ssh_server"
--   local lab = server.lab()        -- temp dir, netns fct-ssh-<pid>-<n> (lo up, 172.16.0.2
--                                   -- on lo), a client key pair: lab.key (0600), lab.pub
--   local d = lab:dropbear{port = 22}   -- started and answering when this returns
--   local o = lab:sshd{port = 2222}
--   ssh.connect(d:opts())           -- {netns=, host=, port=, key=, host_key=}
--   lab:close()                     -- always: stops servers, kills what is left in the
--                                   -- namespace, deletes it, removes the temp dir
--
-- Nothing touches the host: servers listen only inside the namespace; each runs in a
-- private mount namespace with a temporary directory bind-mounted on /root, so commands
-- run as root find an empty home (not the host's dotfiles: bash sources ~/.bashrc when
-- started by sshd) and dropbear finds its authorized_keys there (it reads root's
-- ~/.ssh/authorized_keys and has no option to look elsewhere). sshd also gets a tmpfs on
-- /run for its privilege separation directory /run/sshd.
local sys = require "ssh_sys"

local M = {}
local counter = 0

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Run a shell command; raise with its output if it fails.
local function sh(cmd)
	local f = io.popen("(" .. cmd .. ") 2>&1; echo \"rc=$?\"")
	local out = f:read("*a")
	f:close()
	local body, rc = out:match("^(.-)rc=(%d+)\n?$")
	if rc ~= "0" then error("ssh_server: command failed (" .. tostring(rc) .. "): " .. cmd .. "\n" .. (body or out), 0) end
	return body
end
M.sh = sh
M.q = q

local function write_file(path, s, mode)
	local f = assert(io.open(path, "wb"))
	f:write(s)
	f:close()
	if mode then sh("chmod " .. mode .. " " .. q(path)) end
end

local function read_file(path)
	local f = assert(io.open(path, "rb"))
	local s = f:read("*a")
	f:close()
	return s
end
M.read_file, M.write_file = read_file, write_file

local Lab = {}
Lab.__index = Lab

function M.lab()
	counter = counter + 1
	local lab = setmetatable({servers = {}, host = "172.16.0.2"}, Lab)
	lab.netns = ("fct-ssh-%d-%d"):format(sys.getpid(), counter)
	lab.dir = sh("mktemp -d /tmp/fct-ssh.XXXXXX"):match("[^\n]+")
	local ok, err = pcall(function()
		sh(("ip netns add %s && ip -n %s link set lo up && ip -n %s addr add %s/32 dev lo")
			:format(lab.netns, lab.netns, lab.netns, lab.host))
		lab.created_netns = true
		lab.key = lab.dir .. "/id_ed25519"
		sh("ssh-keygen -q -t ed25519 -N '' -C fct-client -f " .. q(lab.key))
		lab.pub = read_file(lab.key .. ".pub")
	end)
	if not ok then lab:close(); error(err, 0) end
	return lab
end

-- Another client key pair (not authorized anywhere): path of the private key.
function Lab:new_key(name)
	local path = self.dir .. "/" .. name
	sh("ssh-keygen -q -t ed25519 -N '' -C fct-other -f " .. q(path))
	return path
end

local Server = {}
Server.__index = Server

function Server:opts(extra)
	local o = {netns = self.netns, host = self.host, port = self.port, key = self.lab.key,
		host_key = self.host_key, timeout = 10}
	for k, v in pairs(extra or {}) do o[k] = v end
	return o
end

function Server:stop()
	if self.pid then
		sys.stop_child(self.pid, 5000)
		self.pid = nil
	end
end

-- Spawn `script` (a shell command line) inside the lab's namespace as our child, output to
-- a log file; the exec chain (sh, ip netns exec, unshare, sh, server) keeps one pid.
function Lab:spawn(name, script)
	local log = self.dir .. "/" .. name .. ".log"
	local inner = "exec ip netns exec " .. self.netns .. " unshare -m --propagation private sh -c "
		.. q(script)
	return sys.spawn({"sh", "-c", "exec </dev/null >" .. q(log) .. " 2>&1; " .. inner}), log
end

-- Wait until the server accepts our key: the ssh module's own connect retries.
local function wait_ready(srv)
	local ssh = require "fireclaw.ssh"
	local ok, err = pcall(function() ssh.connect(srv:opts()):close() end)
	if not ok then
		error(("ssh_server: %s did not come up: %s\n%s"):format(srv.kind, err,
			read_file(srv.log)), 0)
	end
end

local function add_server(lab, srv)
	setmetatable(srv, Server)
	srv.lab, srv.netns, srv.host = lab, lab.netns, lab.host
	lab.servers[#lab.servers + 1] = srv
	wait_ready(srv)
	return srv
end

function Lab:dropbear(o)
	o = o or {}
	local d = self.dir .. "/dropbear"
	sh(("mkdir -m 700 -p %s/home/.ssh && cp %s %s/home/.ssh/authorized_keys && chmod 600 %s/home/.ssh/authorized_keys")
		:format(q(d), q(self.key .. ".pub"), q(d), q(d)))
	sh(("dropbearkey -t ed25519 -f %s/host_key >/dev/null"):format(q(d)))
	local pub = sh(("dropbearkey -y -f %s/host_key"):format(q(d))):match("(ssh%-ed25519 [^\n]+)")
	write_file(d .. "/host_key.pub", pub .. "\n")
	local port = o.port or 22
	local script = ("mount --bind %s/home /root && exec dropbear -F -E -s -p %s:%d -r %s/host_key -P %s/pid")
		:format(q(d), self.host, port, q(d), q(d))
	local srv = {kind = "dropbear", port = port, host_key = pub, host_key_file = d .. "/host_key.pub"}
	srv.pid, srv.log = self:spawn("dropbear-" .. port, script)
	return add_server(self, srv)
end

function Lab:sshd(o)
	o = o or {}
	local d = self.dir .. "/sshd"
	local port = o.port or 2222
	sh(("mkdir -m 700 -p %s/home && cp %s %s/authorized_keys && ssh-keygen -q -t ed25519 -N '' -f %s/host_key")
		:format(q(d), q(self.key .. ".pub"), q(d), q(d)))
	write_file(d .. "/sshd_config", table.concat({
		"ListenAddress " .. self.host .. ":" .. port,
		"HostKey " .. d .. "/host_key",
		"AuthorizedKeysFile " .. d .. "/authorized_keys",
		"PidFile none",
		"StrictModes no",
		"UsePAM no",
		"PermitRootLogin prohibit-password",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"UseDNS no",
		"Subsystem sftp /usr/lib/openssh/sftp-server",
		""}, "\n"))
	-- sshd needs /run/sshd (privilege separation); a tmpfs on /run in this private mount
	-- namespace gives it one without creating anything on the host
	local script = ("mount -t tmpfs -o mode=755 fct-ssh /run && mkdir -m 755 /run/sshd && mount --bind %s/home /root && exec /usr/sbin/sshd -D -e -f %s/sshd_config")
		:format(q(d), q(d))
	local pub = read_file(d .. "/host_key.pub"):match("[^\n]+")
	local srv = {kind = "sshd", port = port, host_key = pub, host_key_file = d .. "/host_key.pub"}
	srv.pid, srv.log = self:spawn("sshd-" .. port, script)
	return add_server(self, srv)
end

-- Stop everything; safe to call twice and after a partial setup. Errors are collected and
-- raised at the end, after everything that could be removed was.
function Lab:close()
	local problems = {}
	local function try(f, ...)
		local ok, err = pcall(f, ...)
		if not ok then problems[#problems + 1] = tostring(err) end
	end
	for _, srv in ipairs(self.servers) do try(Server.stop, srv) end
	self.servers = {}
	if self.created_netns then
		-- per-connection server processes and commands they started are not our children:
		-- find them by their network namespace, which only this test uses
		try(function()
			for pid in sh("ip netns pids " .. self.netns):gmatch("%d+") do
				pid = tonumber(pid)
				sys.kill(pid, sys.SIGKILL)
				sys.wait_gone(pid, 5000)
			end
		end)
		try(sh, "ip netns del " .. self.netns)
		self.created_netns = false
	end
	if self.dir and self.dir:match("^/tmp/fct%-ssh%.") then
		try(sh, "rm -rf " .. q(self.dir))
		self.dir = nil
	end
	if #problems > 0 then error("ssh_server: cleanup: " .. table.concat(problems, "; "), 0) end
end

return M
