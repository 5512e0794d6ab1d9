/* fuzz/qmp.c - the QMP client of core/vm.c reading arbitrary bytes from "QEMU": the input
 * is everything the peer sends on the QMP socket (greeting, returns, errors, events, in
 * pieces that split lines anywhere, garbage). The client connects (greeting +
 * qmp_capabilities), executes two commands, drains events and waits for one, as the
 * QEMU driver does. Every error must be the client's own ("qmp: …"). */
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>

static const char *const QMP_ERRORS[] = {"qmp: ", NULL};

static const char SESSION[] =
    "local vm, path = ...\n"
    "local q = vm.qmp_connect(path, 5)\n"
    "local g = q:greeting()\n"
    "assert(type(g) == 'table' and g.QMP ~= nil)\n"
    "local ok, err = pcall(q.execute, q, 'query-status', nil, 5)\n"
    "if not ok then assert(tostring(err):match('^qmp: '), err) end\n"
    "local ev = q:events()\n"
    "assert(type(ev) == 'table')\n"
    "for _, e in ipairs(ev) do assert(type(e) == 'table' and e.event ~= nil) end\n"
    "ok, err = pcall(q.execute, q, 'migrate-incoming', {uri = 'fd:x'}, 5)\n"
    "if not ok then assert(tostring(err):match('^qmp: '), err) end\n"
    "ok, err = pcall(q.wait_event, q, 'RESUME', 0)\n"
    "if not ok then assert(tostring(err):match('^qmp: '), err) end\n"
    "q:close()\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *path = fz_peer_start(0);
	lua_State *L = fz_state();
	fz_peer_serve(data, size);
	if (luaL_loadbuffer(L, SESSION, sizeof SESSION - 1, "=session") != 0)
		abort();
	lua_getglobal(L, "require");
	lua_pushliteral(L, "fireclaw.core.vm");
	lua_call(L, 1, 1);
	lua_pushstring(L, path);
	fz_call(L, 2, 0, QMP_ERRORS);
	lua_close(L);
	fz_peer_done();
	return 0;
}
