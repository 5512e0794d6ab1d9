# fuzz.mk - libFuzzer targets (clang, ASan + UBSan) in build/fuzz/; run by `make fuzz`,
# after the main Makefile has generated build/pkg.mk, build/embed.c and build/modules.c.
#   build/fuzz/json     core/json.c: decode -> encode round trip
#   build/fuzz/fc_api   core/fc_vm_api.c: Firecracker API responses (HTTP over a unix socket)
#   build/fuzz/qmp      core/vm.c: the QMP reader (greeting, returns, errors, events)
#   build/fuzz/agent    core/agent.c, core/fc_agent_ops.c: frames from the guest agent
# tests/fuzz.sh runs each on fuzz/corpus/<target>/ and replays fuzz/regressions/<target>/.
include build/pkg.mk

FUZZ_CC ?= clang
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS := -std=gnu11 -g -O1 -Wall -Wextra -Wno-unused-parameter -Icore $(FUZZ_SAN)
FUZZ_OBJDIR := build/fuzz/obj
FUZZ_TARGETS := json fc_api qmp agent

# every core object but main.o, as the unit tests link them
FUZZ_CORE := $(filter-out core/main.c,$(wildcard core/*.c)) build/embed.c build/modules.c
FUZZ_OBJS := $(patsubst %.c,$(FUZZ_OBJDIR)/%.o,$(notdir $(FUZZ_CORE)))

all: $(patsubst %,build/fuzz/%,$(FUZZ_TARGETS))

$(FUZZ_OBJDIR)/%.o: core/%.c $(wildcard core/*.h) build/pkg.mk
	@mkdir -p $(FUZZ_OBJDIR)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(PKG_CFLAGS) -c -o $@ $<

$(FUZZ_OBJDIR)/%.o: build/%.c core/fc.h build/pkg.mk
	@mkdir -p $(FUZZ_OBJDIR)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(PKG_CFLAGS) -c -o $@ $<

$(FUZZ_OBJDIR)/harness.o: fuzz/harness.c fuzz/harness.h core/fc.h build/pkg.mk
	@mkdir -p $(FUZZ_OBJDIR)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -Werror -fsanitize=fuzzer-no-link $(PKG_CFLAGS) -c -o $@ $<

build/fuzz/%: fuzz/%.c fuzz/harness.h $(FUZZ_OBJDIR)/harness.o $(FUZZ_OBJS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -Werror -fsanitize=fuzzer $(PKG_CFLAGS) -o $@ $< \
		$(FUZZ_OBJDIR)/harness.o $(FUZZ_OBJS) $(PKG_LIBS) -lm -lpthread

# objects are kept between builds (they are intermediate to make)
.SECONDARY: $(FUZZ_OBJS) $(FUZZ_OBJDIR)/harness.o

.PHONY: all
