# fireclaw — run commands in throw-away microVMs.
#   make                 build ./fireclaw (installs missing Debian packages first, as root)
#   make test            C unit tests, Lua tests and integration tests on real VMs
#   make SANITIZE=1 test the same with ASan + UBSan (binary: build/san/fireclaw)
#   make test TESTS="tests/json.lua tests/e2e.sh"   some test files only
#   make check           the unit tier: C unit tests and the tests that need neither root
#                        nor a VM (seconds; any user)
#   make lint            luacheck (.luacheckrc) and no LuaJIT FFI outside core/ (tools/lint.sh)
#   make deps            install every Debian package the project needs
#   make install PREFIX=/usr/local
#   make bench           benchmark, writes BENCHMARKS.md
#   make fuzz            libFuzzer targets (clang) in build/fuzz/, see fuzz/fuzz.mk
#   make format          clang-format core/, guest/ and tests/unit/

PREFIX ?= /usr/local
PKGS := luajit libcurl libssh2 libcrypto json-c ext2fs com_err libmnl libedit libnftables
CC ?= cc
CFLAGS ?= -O2 -g
CFLAGS += -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Icore
# libcurl, libnftables, libedit, libssh2 (with libcrypto) and libext2fs (with libcom_err)
# are dlopen'ed on first use (core/fc_curl.c, fc_nft.c, fc_edit.c, fc_ssh2.c, fc_ext2fs.c):
# not linked, see there why; only their headers come from pkg-config
LDLIBS += -lm -ldl

# The sanitizer build has its own objects and binary (build/san/fireclaw), so ./fireclaw
# stays the normal one; `make SANITIZE=1 test` runs the suite with the sanitized binary.
ifeq ($(SANITIZE),1)
OBJDIR := build/san
BIN := build/san/fireclaw
CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer
LDFLAGS += -fsanitize=address,undefined
else
OBJDIR := build/obj
BIN := fireclaw
endif

# every core/*.c but main.c and fc*.c is the Lua module fireclaw.<name>
CSRC := $(sort $(wildcard core/*.c))
MODULES := $(filter-out main fc%,$(basename $(notdir $(CSRC))))
LUASRC := $(sort $(shell find lua recipes -name '*.lua' 2>/dev/null))
OBJS := $(patsubst core/%.c,$(OBJDIR)/%.o,$(CSRC)) $(OBJDIR)/embed.o $(OBJDIR)/modules.o
LIBOBJS := $(filter-out $(OBJDIR)/main.o,$(OBJS))
UNIT := $(patsubst tests/unit/%.c,$(OBJDIR)/unit/%,$(wildcard tests/unit/*.c))

all: $(BIN)

# the guest helper (guest/fireclaw-guest.c): a static binary every image gets as
# /usr/sbin/fireclaw-guest, compiled into fireclaw by core/guest.c (.incbin)
GUEST_BIN := build/guest/fireclaw-guest
$(GUEST_BIN): guest/fireclaw-guest.c build/.deps
	@mkdir -p build/guest
	$(CC) -std=gnu11 -Os -Wall -Wextra -Werror -static -s -o $@ guest/fireclaw-guest.c
# the guest agent (guest/fireclaw-agent.c, docs/agent-protocol.md): every image gets it as
# /usr/sbin/fireclaw-agent, also compiled into fireclaw by core/guest.c
AGENT_BIN := build/guest/fireclaw-agent
$(AGENT_BIN): guest/fireclaw-agent.c guest/agent-proto.h build/.deps
	@mkdir -p build/guest
	$(CC) -std=gnu11 -Os -Wall -Wextra -Werror -static -s -o $@ guest/fireclaw-agent.c
# the initramfs's /init (guest/fireclaw-init.c): modules, root disk, network, the agent,
# then the image's init; also compiled into fireclaw by core/guest.c
INIT_BIN := build/guest/fireclaw-init
$(INIT_BIN): guest/fireclaw-init.c guest/init-modules.h build/.deps
	@mkdir -p build/guest
	$(CC) -std=gnu11 -Os -Wall -Wextra -Werror -static -s -o $@ guest/fireclaw-init.c
$(OBJDIR)/guest.o: $(GUEST_BIN) $(AGENT_BIN) $(INIT_BIN)
$(OBJDIR)/agent.o $(OBJDIR)/fc_agent_ops.o: guest/agent-proto.h
# the module selection of fireclaw-init, driven on the host with a made-up sysfs tree
$(OBJDIR)/unit/test_init_modules: guest/init-modules.h
$(filter-out $(OBJDIR)/unit/test_init_modules,$(UNIT)): tests/unit/tap.h

build/.deps: tools/deps.sh
	@mkdir -p build
	@tools/deps.sh --check 2>/dev/null || tools/deps.sh
	@touch $@

# LuaJIT and json-c go into the binary (their archives come with the -dev packages): two
# shared objects fewer to map and relocate at every start (~0.2 ms of CPU; DECISIONS.md)
build/pkg.mk: build/.deps Makefile
	@echo "PKG_CFLAGS := $$(pkg-config --cflags $(PKGS))" > $@.tmp
	@echo "PKG_LIBS := $$(pkg-config --libs $(PKGS) | sed 's/-lcurl//; s/-ledit//; s/-lnftables//; s/-lssh2//; s/-lcrypto//; s/-lext2fs//; s/-lcom_err//; s/-lluajit-5.1/-Wl,-Bstatic -lluajit-5.1 -Wl,-Bdynamic/; s/-ljson-c/-Wl,-Bstatic -ljson-c -Wl,-Bdynamic/')" >> $@.tmp
	@mv $@.tmp $@
-include build/pkg.mk

$(BIN): $(OBJS)
	$(CC) $(LDFLAGS) -o $@ $(OBJS) $(PKG_LIBS) $(LDLIBS)

$(OBJDIR)/%.o: core/%.c $(wildcard core/*.h) build/pkg.mk
	@mkdir -p $(OBJDIR)
	$(CC) $(CFLAGS) $(PKG_CFLAGS) -c -o $@ $<

$(OBJDIR)/%.o: build/%.c core/fc.h build/pkg.mk
	@mkdir -p $(OBJDIR)
	$(CC) $(CFLAGS) $(PKG_CFLAGS) -c -o $@ $<

build/embed.c: tools/embed.lua $(LUASRC) build/.deps
	luajit tools/embed.lua $@ $(LUASRC)

build/modules.c: Makefile $(CSRC)
	@mkdir -p build
	@{ echo '#include "fc.h"'; \
	  for m in $(MODULES); do echo "int luaopen_fireclaw_$$m(lua_State *L);"; done; \
	  echo 'const luaL_Reg fc_cmodules[] = {'; \
	  for m in $(MODULES); do echo "	{\"$$m\", luaopen_fireclaw_$$m},"; done; \
	  echo '	{NULL, NULL},'; echo '};'; } > $@

$(OBJDIR)/unit/%: tests/unit/%.c $(LIBOBJS)
	@mkdir -p $(OBJDIR)/unit
	$(CC) $(CFLAGS) $(PKG_CFLAGS) $(LDFLAGS) -o $@ $< $(LIBOBJS) $(PKG_LIBS) $(LDLIBS)

test: $(BIN) $(UNIT)
	FIRECLAW=$(abspath $(BIN)) UNIT_DIR=$(OBJDIR)/unit tests/run $(TESTS)

# the unit tier: no root, no VM, no network namespace, a few seconds (docs/HACKING.md)
CHECK_TESTS := tests/json.lua tests/jsonrpc.lua tests/sys.lua tests/fs.lua tests/boot_args.lua tests/netpolicy.lua tests/cgroup.lua tests/cstrings.lua \
	tests/rootfs.lua tests/docs.sh tests/apidoc.lua tests/lint.sh tests/repl.py tests/agent_proto.lua
check: $(BIN) $(UNIT)
	FIRECLAW=$(abspath $(BIN)) UNIT_DIR=$(OBJDIR)/unit tests/run $(UNIT) $(CHECK_TESTS)

lint:
	tools/lint.sh

deps:
	tools/deps.sh

# measures this machine (about 5-10 min) and writes BENCHMARKS.md; see bench/bench.py
bench: fireclaw
	bench/run.sh

# libFuzzer targets (clang + ASan/UBSan) in build/fuzz/; tests/fuzz.sh runs them
fuzz: build/pkg.mk build/embed.c build/modules.c $(GUEST_BIN) $(AGENT_BIN) $(INIT_BIN)
	$(MAKE) -f fuzz/fuzz.mk

install: fireclaw
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 755 fireclaw $(DESTDIR)$(PREFIX)/bin/fireclaw
	install -m 644 docs/fireclaw.1 $(DESTDIR)$(PREFIX)/share/man/man1/fireclaw.1

format:
	clang-format -i core/*.c core/*.h guest/*.c $(wildcard tests/unit/*.c)

clean:
	rm -rf build fireclaw

.PHONY: all test check lint deps install format clean bench fuzz FORCE
