/* guest.c - fireclaw.core.guest: the guest helper program, compiled into fireclaw.
 *
 *   guest.helper() -> the bytes of build/guest/fireclaw-guest (guest/fireclaw-guest.c, a
 *                     static x86_64 binary), which fireclaw.image installs in every image
 *                     it builds as /usr/sbin/fireclaw-guest
 *   guest.agent()  -> the bytes of build/guest/fireclaw-agent (guest/fireclaw-agent.c, the
 *                     guest agent: docs/agent-protocol.md), /usr/sbin/fireclaw-agent
 *   guest.init()   -> the bytes of build/guest/fireclaw-init (guest/fireclaw-init.c), the
 *                     initramfs's /init
 *
 * Why compiled in: an image build must not depend on where fireclaw was installed from;
 * the one binary carries everything it writes into a guest (like the embedded Lua). The
 * bytes sit in .rodata and cost nothing until an image build reads them.
 */
#include "fc.h"

#ifndef FC_GUEST_HELPER
#define FC_GUEST_HELPER "build/guest/fireclaw-guest"
#endif
#ifndef FC_GUEST_AGENT
#define FC_GUEST_AGENT "build/guest/fireclaw-agent"
#endif
#ifndef FC_GUEST_INIT
#define FC_GUEST_INIT "build/guest/fireclaw-init"
#endif

__asm__(".section .rodata\n"
	".balign 16\n"
	"fc_guest_helper_start:\n"
	".incbin \"" FC_GUEST_HELPER "\"\n"
	"fc_guest_helper_end:\n"
	".balign 16\n"
	"fc_guest_agent_start:\n"
	".incbin \"" FC_GUEST_AGENT "\"\n"
	"fc_guest_agent_end:\n"
	".balign 16\n"
	"fc_guest_init_start:\n"
	".incbin \"" FC_GUEST_INIT "\"\n"
	"fc_guest_init_end:\n"
	".previous\n");

extern const char fc_guest_helper_start[] __asm__("fc_guest_helper_start");
extern const char fc_guest_helper_end[] __asm__("fc_guest_helper_end");
extern const char fc_guest_agent_start[] __asm__("fc_guest_agent_start");
extern const char fc_guest_agent_end[] __asm__("fc_guest_agent_end");
extern const char fc_guest_init_start[] __asm__("fc_guest_init_start");
extern const char fc_guest_init_end[] __asm__("fc_guest_init_end");

static int l_init(lua_State *L)
{
	lua_pushlstring(L, fc_guest_init_start, (size_t)(fc_guest_init_end - fc_guest_init_start));
	return 1;
}

static int l_agent(lua_State *L)
{
	lua_pushlstring(L, fc_guest_agent_start,
			(size_t)(fc_guest_agent_end - fc_guest_agent_start));
	return 1;
}

static int l_helper(lua_State *L)
{
	lua_pushlstring(L, fc_guest_helper_start,
			(size_t)(fc_guest_helper_end - fc_guest_helper_start));
	return 1;
}

int luaopen_fireclaw_guest(lua_State *L)
{
	static const luaL_Reg fns[] = {
	    {"helper", l_helper},
	    {"agent", l_agent},
	    {"init", l_init},
	    {NULL, NULL},
	};
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
