/* fuzz/agent.c - the host side of the guest agent's channel (core/agent.c,
 * core/fc_agent_ops.c) reading arbitrary bytes from "the guest": the input is everything
 * the peer sends (a hello answer, output, exits, windows, files, results, garbage, in
 * pieces that split frames anywhere). The client says hello, runs a command with stdin,
 * gets a file, and does a restore hand-off, as fireclaw does. Every error must be the
 * client's own ("agent: …"). */
#include "harness.h"

static const char *const AGENT_ERRORS[] = {"agent: ", NULL};

static const char SESSION[] =
    "local agent, path = ...\n"
    "local c = agent.connect(path, {timeout = 5, where = 'fuzz'})\n"
    "local function check(ok, err)\n"
    "  if not ok then assert(tostring(err):match('^agent: '), err) end\n"
    "end\n"
    "check(pcall(c.exec, c, {'sh', '-c', 'x'}, {stdin = 'abc', timeout = 5, max_capture = 100,\n"
    "  on_stdout = function(d) assert(type(d) == 'string') end}))\n"
    "check(pcall(c.get, c, '/etc/x', path .. '.got', {max_bytes = 4096}))\n"
    "check(pcall(c.handoff, c, 1e18, string.rep('e', 64), 5))\n"
    "check(pcall(c.batch, c, {{exec = {'a'}}, {exec = {'b'}, pty = true}}))\n"
    "os.remove(path .. '.got')\n"
    "c:close()\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fz_peer_session(data, size, SESSION, "fireclaw.core.agent", AGENT_ERRORS);
	return 0;
}
