/* fc_vm.h - what core/vm.c (fireclaw.vm: QMP, waits, log tails) and core/fc_vm_api.c (its
 * Firecracker API client) share. Private to them. */
#ifndef FC_VM_H
#define FC_VM_H

#include "fc.h"

/* Bounds on what a VMM may make fireclaw hold: an API response body, a QMP line. Real
 * ones are a few KiB; a VMM that sends more is broken (or not the VMM). */
#define MAX_MESSAGE (16u << 20)

/* JSON through fireclaw.json (one implementation of the null/array rules). Decode pushes
 * the value and returns 1, or pushes the error message and returns 0; encode pushes the
 * text of the value at idx and returns it (raises on values JSON cannot hold). */
int vm_json_decode(lua_State *L, const char *s, size_t len);
const char *vm_json_encode(lua_State *L, int idx, size_t *len);

/* vm.api_client, and the class of its objects (core/fc_vm_api.c) */
int vm_l_api_client(lua_State *L);
void vm_api_class(lua_State *L);
/* How an API answer becomes a Lua result (tested by fuzz/fc_api.c). */
int fc_api_result(lua_State *L, const char *name, const char *method, const char *path, long status,
		  const char *body, size_t len);

#endif
