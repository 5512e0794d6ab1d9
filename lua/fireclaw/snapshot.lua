-- fireclaw.snapshot: snapshot directories, their metadata and validation.
--
-- Layout: $FIRECLAW_STATE/snapshots/NAME/ (NAME defaults to the image name)
--   vmstate     device state (Firecracker snapshot file, or QEMU migration stream)
--   memory      guest RAM (copied or mapped copy-on-write by every restore: never written)
--   disk.ext4   the disk as it was at snapshot time (each restore gets its own copy)
--   meta.json   {format, name, image, image_sha256, vmm, vmm_version, accel, vcpu, mem_mib,
--                guest_ip, guest_mac, tap_mac, host_key, boot_args, created, files}
-- A snapshot is built in snapshots/.tmp-NAME-PID and renamed into place, so a crash never
-- leaves a directory that looks valid; a snapshot whose files are missing or whose sizes
-- differ from meta.json is refused, as is one taken from another image, VMM or VMM
-- version (run then cold boots, with a one-line note).
local config = require "fireclaw.config"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local M = {}

M.FORMAT = 1
local FILES = { "vmstate", "memory", "disk.ext4" }

local function root() return config.state_dir .. "/snapshots" end

function M.check_name(name)
	if type(name) ~= "string" or not name:match("^[%w][%w._-]*$") or #name > 64 then
		error(string.format("snapshot: bad name '%s' (letters, digits, '.', '_', '-')", tostring(name)), 0)
	end
	return name
end

function M.dir(name) return root() .. "/" .. M.check_name(name) end

-- Start writing snapshot NAME: a fresh temporary directory to fill.
function M.begin(name)
	M.check_name(name)
	fs.mkdir_p(root(), "700")
	local tmp = string.format("%s/.tmp-%s-%d", root(), name, proc.getpid())
	fs.rm_rf(tmp)
	fs.mkdir(tmp, "700")
	return tmp
end

-- Finish: record sizes, write meta.json, and swap the directory into place atomically.
function M.commit(tmp, name, meta)
	meta.format, meta.name, meta.created = M.FORMAT, name, meta.created or os.time()
	meta.files = {}
	for _, f in ipairs(FILES) do
		local size = fs.size(tmp .. "/" .. f)
		if not size then error("snapshot: " .. f .. " was not written", 0) end
		meta.files[f] = { size = size }
	end
	fs.write(tmp .. "/meta.json", json.encode(meta, { pretty = true }), "600")
	local dir = M.dir(name)
	local old = string.format("%s/.old-%s-%d", root(), name, proc.getpid())
	if fs.exists(dir) then fs.rename(dir, old) end
	fs.rename(tmp, dir)
	fs.rm_rf(old)
	return M.load(name)
end

function M.abort(tmp)
	if tmp then pcall(fs.rm_rf, tmp) end
end

-- Snapshot NAME with its paths, or nil and why it cannot be used.
function M.load(name)
	local dir = M.dir(name)
	local text = fs.read(dir .. "/meta.json")
	if not text then return nil, "no snapshot named '" .. name .. "'" end
	local ok, meta = pcall(json.decode, text)
	if not ok or type(meta) ~= "table" or meta.format ~= M.FORMAT then
		return nil, string.format("snapshot '%s' has an unreadable meta.json (%s)", name,
			ok and "unknown format" or tostring(meta))
	end
	local function count(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end
	if type(meta.vmm) ~= "string" or not count(meta.vcpu) or not count(meta.mem_mib)
		or type(meta.files) ~= "table" then
		return nil, string.format("snapshot '%s' has a damaged meta.json (vmm, vcpu, mem_mib or files)", name)
	end
	meta.name = name -- the directory's name is the one the user gave
	for _, f in ipairs(FILES) do
		local want = type(meta.files[f]) == "table" and meta.files[f].size or nil
		local size = fs.size(dir .. "/" .. f)
		if not size then return nil, string.format("snapshot '%s' is missing %s", name, f) end
		if size ~= want then
			return nil, string.format("snapshot '%s': %s is %d bytes, meta.json says %s (truncated or replaced)",
				name, f, size, tostring(want))
		end
	end
	meta.dir, meta.vmstate, meta.memory, meta.disk = dir, dir .. "/vmstate", dir .. "/memory", dir .. "/disk.ext4"
	return meta
end

-- Can this snapshot be restored with this image, this VMM and this accelerator? true, or
-- false and why. accel_source (config.choice) says whether the accelerator was forced.
-- A QEMU snapshot holds CPU state of its accelerator: TCG's and KVM's do not load into
-- each other.
function M.compatible(meta, img, vmm, vmm_version, accel, accel_source)
	if meta.image ~= img.name then
		return false, string.format("it was taken from image '%s', not '%s'", tostring(meta.image), img.name)
	end
	if meta.image_sha256 ~= M.image_sha256(img) then
		return false, string.format("image '%s' was rebuilt since the snapshot was taken", img.name)
	end
	if meta.vmm ~= vmm then
		return false, string.format("it was taken with %s, this run uses %s", tostring(meta.vmm), vmm)
	end
	if meta.vmm_version ~= vmm_version then
		return false, string.format("it was taken with %s %s, this is %s", vmm, tostring(meta.vmm_version),
			tostring(vmm_version))
	end
	if accel and meta.accel and meta.accel ~= accel then
		local forced = accel_source and accel_source ~= "auto"
		return false, string.format("it was taken under %s, this run %s %s%s", tostring(meta.accel),
			forced and "forces" or "uses", accel, forced and (" (" .. accel_source .. ")") or "")
	end
	-- taken before VMs had an entropy device (the device set is part of the saved state)
	if type(meta.vmm_info) ~= "table" or type(meta.vmm_info.rng) ~= "boolean" then
		return false, "it was taken by an older fireclaw (no entropy device): re-create it"
	end
	-- every Firecracker VM has a vsock device (the guest agent's channel); an older snapshot
	-- would restore without one
	if meta.vmm == "firecracker" and type(meta.vmm_info.vsock) ~= "table" then
		return false, "it was taken by an older fireclaw (no vsock device): re-create it"
	end
	return true
end

-- The identity of an image's bootable content (rootfs + kernel + initrd) from its manifest.
function M.image_sha256(img)
	local a = img.files or {}
	local function sum(k)
		local v = a[k]
		return type(v) == "table" and (v.sha256 or "") or tostring(v or "")
	end
	return sum("rootfs.ext4") .. ":" .. sum("vmlinux") .. ":" .. sum("initrd")
end

-- All snapshots: {{name=, meta=} or {name=, error=}}.
function M.list()
	local out = {}
	for _, name in ipairs(runtime.listdir(root()) or {}) do
		if not name:match("^%.") then
			local meta, err = M.load(name)
			out[#out + 1] = { name = name, meta = meta, error = err }
		end
	end
	return out
end

-- The names of the snapshots taken from image `name` (unusable ones too), sorted.
function M.of_image(image_name)
	local out = {}
	for _, name in ipairs(runtime.listdir(root()) or {}) do
		local text = not name:match("^%.") and fs.read(root() .. "/" .. name .. "/meta.json")
		local ok, meta = pcall(json.decode, text or "")
		if text and ok and type(meta) == "table" and meta.image == image_name then out[#out + 1] = name end
	end
	table.sort(out)
	return out
end

function M.remove(name)
	local dir = M.dir(name)
	if not fs.exists(dir) then error("snapshot: no snapshot named '" .. name .. "' (see: fireclaw snapshot list)", 0) end
	fs.rm_rf(dir)
end

-- Remove temporary directories left by interrupted snapshot builds.
function M.clean_temp()
	for _, name in ipairs(runtime.listdir(root()) or {}) do
		local pid = name:match("^%.tmp%-.-%-(%d+)$") or name:match("^%.old%-.-%-(%d+)$")
		if pid and not proc.alive(tonumber(pid)) then fs.rm_rf(root() .. "/" .. name) end
	end
end

return M
