/* fuzz/json.c - fireclaw.json (core/json.c) through a Lua state: decode arbitrary bytes;
 * whatever decodes must encode, and the encoding must be a fixed point:
 * encode(decode(e)) == e, plain and pretty. Errors must be json's own ("json: …"). */
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const JSON_ERRORS[] = {"json: ", NULL};

/* After a successful decode nothing may raise: an error there is reported as a bug
 * ("round trip: …" does not match the accepted prefix). */
static const char ROUND_TRIP[] =
    "local json, s = ...\n"
    "local ok, v = pcall(json.decode, s)\n"
    "if not ok then\n"
    "  if not tostring(v):match('^json: ') then error('decode raised: ' .. tostring(v)) end\n"
    "  return\n"
    "end\n"
    "local function check()\n"
    "  local e1 = json.encode(v)\n"
    "  local e2 = json.encode(json.decode(e1))\n"
    "  if e1 ~= e2 then error('not a fixed point:\\n' .. e1 .. '\\n' .. e2) end\n"
    "  local p = json.encode(json.decode(json.encode(v, {pretty = true})))\n"
    "  if p ~= e1 then error('pretty differs:\\n' .. e1 .. '\\n' .. p) end\n"
    "end\n"
    "local ok2, err = pcall(check)\n"
    "if not ok2 then error('round trip: ' .. tostring(err), 0) end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	lua_State *L = fz_state();
	if (luaL_loadbuffer(L, ROUND_TRIP, sizeof ROUND_TRIP - 1, "=round_trip") != 0)
		abort();
	lua_getglobal(L, "require");
	lua_pushliteral(L, "fireclaw.json");
	lua_call(L, 1, 1);
	lua_pushlstring(L, (const char *)data, size);
	fz_call(L, 2, 0, JSON_ERRORS);
	lua_close(L);
	return 0;
}
