/* fuzz/fc_api.c - the Firecracker API client of core/fc_vm_api.c reading arbitrary HTTP
 * responses: the input is what the "VMM" answers on its API socket (status line, headers,
 * body, in pieces), read through libcurl exactly as vm.api_client does, then a second
 * request on the same client (connection reuse after the peer hung up). The status/body
 * interpretation (fc_api_result: fault_message extraction) is also fed the input
 * directly. Every error must be the client's own ("firecracker: …"). */
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int fc_api_result(lua_State *L, const char *name, const char *method, const char *path,
		  long status, const char *body, size_t len);

static const char *const API_ERRORS[] = {"firecracker: ", NULL};

static const char REQUESTS[] =
    "local vm, path = ...\n"
    "local api = vm.api_client(path, {timeout = 5})\n"
    "local ok, err = pcall(api.get, api, '/version')\n"
    "if not ok then assert(tostring(err):match('^firecracker: GET /version: '), err) end\n"
    "ok, err = pcall(api.put, api, '/boot-source', {kernel_image_path = '/k', boot_args = 'x'})\n"
    "if not ok then assert(tostring(err):match('^firecracker: PUT /boot%-source: '), err) end\n"
    "api:close()\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *path = fz_peer_start(1);
	lua_State *L = fz_state();

	/* 1. the whole exchange over a socket */
	fz_peer_serve(data, size);
	fz_session(L, "=requests", REQUESTS, "fireclaw.core.vm", path, API_ERRORS);

	/* 2. status (first two bytes) and body (the rest) straight into the interpretation */
	long status = size >= 2 ? 100 + (data[0] << 8 | data[1]) % 500 : 200;
	const char *body = size >= 2 ? (const char *)data + 2 : "";
	size_t len = size >= 2 ? size - 2 : 0;
	int top = lua_gettop(L);
	int ok = fc_api_result(L, "firecracker", "PUT", "/x", status, body, len);
	if (lua_gettop(L) != top + 1 || (!ok && !lua_isstring(L, -1)))
		abort();
	if (!ok && strncmp(lua_tostring(L, -1), "firecracker: PUT /x: ", 21) != 0)
		abort();
	lua_close(L);
	fz_peer_done();
	return 0;
}
