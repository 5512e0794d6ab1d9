/* fuzz/qmp.c - the QMP client of core/vm.c reading arbitrary bytes from "QEMU": the input
 * is everything the peer sends on the QMP socket (greeting, returns, errors, events, in
 * pieces that split lines anywhere, garbage). The client connects (greeting +
 * qmp_capabilities), executes two commands, drains events and waits for one, as the
 * QEMU driver does. Every error must be the client's own ("qmp: …"). */
#include "harness.h"

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
	fz_peer_session(data, size, SESSION, "fireclaw.core.vm", QMP_ERRORS);
	return 0;
}
