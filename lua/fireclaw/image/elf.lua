-- fireclaw.image.elf: reading kernels and ELF files — the ELF vmlinux inside a bzImage
-- (gzip, xz, lz4, zstd, bzip2, lzma payloads), the dynamic section of a program (its
-- loader and libraries), and what kind of kernel a file is.
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"

local fail = common.fail

local M = {}

-- little-endian unsigned integer of n bytes at 0-based off
local function le(s, off, n)
	local v = 0
	for i = n, 1, -1 do v = v * 256 + s:byte(off + i) end
	return v
end
M.le = le

local COMPRESSION = {
	{ "gzip", "\31\139", { "gzip", "-dc" } },
	{ "xz", "\253\55\122\88\90\0", { "xz", "-dc", "--single-stream" } },
	{ "lz4", "\2\33\76\24", { "lz4", "-dc" } },
	{ "zstd", "\40\181\47\253", { "zstd", "-dc" } },
	{ "bzip2", "BZh", { "bzip2", "-dc" } },
	{ "lzma", "\93\0\0", { "xz", "-dc", "--format=lzma" } },
}

-- Is s a complete ELF64 (headers and section table inside the string)?
local function elf_ok(s)
	if #s < 64 or s:sub(1, 4) ~= "\127ELF" then return false end
	local shoff, shentsize, shnum = le(s, 0x28, 8), le(s, 0x3a, 2), le(s, 0x3c, 2)
	return shoff + shentsize * shnum <= #s
end

-- Recover the ELF vmlinux from a bzImage at bzpath, written to outpath.
-- Uses the boot protocol header's payload_offset/length when there is one (the last 4
-- bytes of the payload are the uncompressed size, checked), else scans for a known
-- compression magic. Returns {compression=, size=}.
function M.bzimage_to_elf(bzpath, outpath)
	local data = fs.read(bzpath)
	if not data then fail("cannot read kernel %s", bzpath) end
	if data:sub(1, 4) == "\127ELF" then fail("%s is already an ELF (vmlinux)", bzpath) end
	local candidates = {}
	if #data > 0x250 and data:sub(0x203, 0x206) == "HdrS" and le(data, 0x206, 2) >= 0x208 then
		local setup = data:byte(0x1f2)
		if setup == 0 then setup = 4 end
		local start = (setup + 1) * 512 + le(data, 0x248, 4)
		local len = le(data, 0x24c, 4)
		if len > 4 and start + len <= #data then
			candidates[1] = { start = start, len = len, expect = le(data, start + len - 4, 4) }
		end
	end
	for _, comp in ipairs(COMPRESSION) do -- fallback: every occurrence of every magic
		local pos = 1
		while #candidates < 64 do
			local at = data:find(comp[2], pos, true)
			if not at then break end
			candidates[#candidates + 1] = { start = at - 1, len = #data - at + 1 }
			pos = at + 1
		end
	end
	for _, cand in ipairs(candidates) do
		local payload = data:sub(cand.start + 1, cand.start + cand.len)
		for _, comp in ipairs(COMPRESSION) do
			if payload:sub(1, #comp[2]) == comp[2] then
				-- trailing bytes (the size field, the rest of the image) make some
				-- decompressors exit non-zero after writing everything: judge the output
				local out = common.try_run(comp[3], { stdin = payload }).stdout
				if elf_ok(out) and (not cand.expect or cand.expect == #out) then
					fs.write(outpath, out, "644")
					return { compression = comp[1], size = #out }
				end
			end
		end
	end
	fail("no ELF kernel found inside %s (compression not recognised)", bzpath)
end

-- {interp = "/lib64/ld-linux-x86-64.so.2" | nil, needed = {"libc.so.6", …}} or nil (not ELF64)
function M.elf_info(s)
	if #s < 64 or s:sub(1, 4) ~= "\127ELF" or s:byte(5) ~= 2 or s:byte(6) ~= 1 then return nil end
	local phoff, phentsize, phnum = le(s, 0x20, 8), le(s, 0x36, 2), le(s, 0x38, 2)
	local loads, dyn, info = {}, nil, { needed = {} }
	for i = 0, phnum - 1 do
		local p = phoff + i * phentsize
		local ptype, off, vaddr, filesz = le(s, p, 4), le(s, p + 8, 8), le(s, p + 16, 8), le(s, p + 32, 8)
		if ptype == 1 then
			loads[#loads + 1] = { off = off, vaddr = vaddr, filesz = filesz }
		elseif ptype == 2 then
			dyn = { off = off, size = filesz }
		elseif ptype == 3 then
			info.interp = s:sub(off + 1, off + filesz):match("^[^%z]+")
		end
	end
	if not dyn then return info end
	local strtab, needed = nil, {}
	for p = dyn.off, dyn.off + dyn.size - 16, 16 do
		local tag, val = le(s, p, 8), le(s, p + 8, 8)
		if tag == 0 then break end
		if tag == 1 then needed[#needed + 1] = val end
		if tag == 5 then strtab = val end
	end
	if strtab then
		local stroff
		for _, l in ipairs(loads) do
			if strtab >= l.vaddr and strtab < l.vaddr + l.filesz then stroff = l.off + strtab - l.vaddr end
		end
		for _, n in ipairs(needed) do
			if stroff then info.needed[#info.needed + 1] = s:match("^[^%z]+", stroff + n + 1) end
		end
	end
	return info
end

-- "elf", "bzimage" or nil for the kernel file at path.
function M.kernel_kind(path)
	local f = io.open(path, "rb")
	if not f then fail("cannot read %s", path) end
	local head = f:read(0x210) or ""
	f:close()
	if head:sub(1, 4) == "\127ELF" then return "elf" end
	if head:sub(0x203, 0x206) == "HdrS" then return "bzimage" end
	return nil
end

return M
