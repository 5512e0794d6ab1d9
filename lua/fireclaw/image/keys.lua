-- fireclaw.image.keys: the client key pair all images share (keys/id_ed25519{,.pub},
-- made with ssh-keygen on first use) and the hash of the guest helper fireclaw installs.
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local guest = require "fireclaw.guest"
local proc = require "fireclaw.proc"
local sys = require "fireclaw.sys"

local run = common.run

local M = {}

-- Path of the client private key and its public line; made on first use (ssh-keygen).
-- The private key is created with link(2) (fails if it exists), so concurrent first uses
-- agree on one key; the .pub is always derived from the private key.
function M.client_key()
	local dir = common.keys_dir()
	local key = dir .. "/id_ed25519"
	common.mkdir_p(dir, "700")
	if not fs.exists(key) then
		local tmp = dir .. "/.new-" .. proc.getpid()
		os.remove(tmp)
		os.remove(tmp .. ".pub")
		run("creating the client key", { "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
			"fireclaw", "-f", tmp })
		fs.chmod(tmp, "600")
		sys.link(tmp, key) -- EEXIST: someone else won, use theirs
		os.remove(tmp)
		os.remove(tmp .. ".pub")
		common.log("keys: client key %s (new)", key)
	end
	local pub = dir .. "/id_ed25519.pub"
	local line = fs.read(pub)
	if not line or not line:match("^ssh%-ed25519 ") then
		line = run("reading the client key", { "ssh-keygen", "-y", "-f", key }).stdout
		line = line:gsub("%s+$", "") .. " fireclaw\n"
		fs.write(pub, line, "644")
	end
	return key, (line:gsub("%s+$", ""))
end

-- sha256 of the guest helper fireclaw installs (part of an image's identity: a changed
-- helper makes `image build` build anew, and snapshots of the old image stale)
local helper_sha
function M.helper_sha256()
	helper_sha = helper_sha or common.sha256_of("hashing the guest helper", guest.helper())
	return helper_sha
end

local init_sha
function M.init_sha256()
	init_sha = init_sha or common.sha256_of("hashing the initramfs's init", guest.init())
	return init_sha
end

local agent_sha
function M.agent_sha256()
	agent_sha = agent_sha or common.sha256_of("hashing the guest agent", guest.agent())
	return agent_sha
end

return M
