-- The one TCG boot-argument policy (fireclaw.vmm.util.tcg_boot_args), which image.boot_args
-- and the QEMU driver both use: this host's tsc_early_khz replaces the build host's, is
-- added when missing, and goes when this host's is unknown. Needs neither root nor a VM.
local t = require "tap"
local image = require "fireclaw.image"
local util = require "fireclaw.vmm.util"

local CPU = "processor\t: 0\ncpu MHz\t\t: 2445.428\n"
local tcg = util.tcg_boot_args

t.is(util.tsc_khz(CPU), 2445428, "tsc_khz from cpu MHz")
t.is(util.tsc_khz("nothing"), nil, "tsc_khz: nil without cpu MHz")
t.is(image.tsc_khz, util.tsc_khz, "image.tsc_khz is the same function")
t.is(tcg("console=ttyS0 rw", { "tsc_early_khz=1" }, CPU), "console=ttyS0 rw tsc_early_khz=2445428",
	"the build host's tsc_early_khz is replaced by this host's")
t.is(tcg("a", { "x=1", "tsc_early_khz=1", "y" }, CPU), "a x=1 tsc_early_khz=2445428 y",
	"... in its place, the other extras kept in order")
t.is(tcg("a", "x=1  tsc_early_khz=5", CPU), "a x=1 tsc_early_khz=2445428", "extras may be a string")
t.is(tcg("a", nil, CPU), "a tsc_early_khz=2445428", "no extras: this host's tsc_early_khz is added")
t.is(tcg("a", {}, CPU), "a tsc_early_khz=2445428", "empty extras: added too")
t.is(tcg("a tsc_early_khz=7", nil, CPU), "a tsc_early_khz=7", "not added when the arguments have one")
t.is(tcg("a", { "tsc_early_khz=1", "b" }, ""), "a b", "this host's unknown: the build host's value goes")
t.is(tcg("a", nil, ""), "a", "this host's unknown, no extras: the arguments as they are")

-- image.boot_args is the same policy over a manifest's lists
local img = { boot_args = { "console=ttyS0", "rw" }, boot_args_tcg = { "tsc_early_khz=1" } }
t.is(image.boot_args(img, { tcg = true }), tcg("console=ttyS0 rw", { "tsc_early_khz=1" }),
	"image.boot_args under TCG = tcg_boot_args of the manifest's lists")
t.like(image.boot_args(img, { tcg = true }), "^console=ttyS0 rw tsc_early_khz=%d+$", "... with this host's value")
t.is(image.boot_args(img), "console=ttyS0 rw", "no TCG: the boot arguments alone")
t.is(image.boot_args({ boot_args_tcg = { "b" } }), table.concat(image.default_boot_args(), " "),
	"no boot_args: the defaults")
-- an image fireclaw builds boots with the defaults plus BUILT_BOOT_ARGS; imports keep the defaults
local built, defaults = image.built_boot_args(), image.default_boot_args()
t.same({ unpack(built, 1, #defaults) }, defaults, "built images: the defaults first")
t.same({ unpack(built, #defaults + 1) }, image.BUILT_BOOT_ARGS, "... then BUILT_BOOT_ARGS")
t.ok(table.concat(built, " "):find("lsm=landlock", 1, true), "built images: lsm=landlock (no AppArmor, IMA, …)")
t.like(table.concat(built, " "), "initcall_blacklist=init_kprobe_trace,[%w_,]*load_system_certificate_list",
	"built images: initcall_blacklist= of the boot work a throw-away guest does not need")
t.ok(not table.concat(defaults, " "):find("lsm=", 1, true), "the defaults (imports) choose no LSMs")
t.ok(not table.concat(defaults, " "):find("initcall_blacklist", 1, true), "... and blacklist no initcalls")
t.raises(function() image.boot_args(img, { tgc = true }) end, "unknown option 'tgc'", "a misspelt option raises")
return t.done()
