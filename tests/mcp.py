"""fireclaw mcp, driven as an MCP client would (JSON-RPC lines over pipes), on real VMs:
a whole session (initialize → tools/list → start → exec → write_file → read_file → run →
stop → list → EOF), bad requests answered with JSON-RPC errors while the server stays up,
the limits, SIGTERM and SIGKILL mid-session; each followed by the leak check. Prints TAP.
FIRECLAW_MCP_TRANSCRIPT=FILE writes the session's messages there (long ones abbreviated)."""
import base64, json, os, select, signal, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from tap import done, ok

import jsonschema

FC = os.environ.get("FIRECLAW", "./fireclaw")
TESTS = os.environ.get("FIRECLAW_TESTS", os.path.join(os.path.dirname(os.path.abspath(__file__))))
TAG = os.environ.get("FIRECLAW_TEST_TAG", "")
tmp = tempfile.mkdtemp(prefix="fc-mcp-")
ENV = dict(os.environ, FIRECLAW_VMM="qemu", FIRECLAW_RUN=tmp + "/run", FIRECLAW_NETNS_PREFIX="fc-%smcp" % TAG)
SNAP = "mcp-test%s" % TAG
transcript = []


def leaks():
    r = subprocess.run(["bash", "-c", 'source "$1/lib/leaks.sh"; leaks', "-", TESTS], env=ENV,
                       capture_output=True, text=True)
    return r.stdout + r.stderr


def no_leaks(name):
    lk = leaks()
    ok(lk == "", "nothing left behind: " + name, lk)


def netns():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [l.split()[0] for l in out.splitlines() if l.startswith(ENV["FIRECLAW_NETNS_PREFIX"])]


def short(b, limit=400):
    s = b.decode("utf-8", "replace") if isinstance(b, bytes) else b
    return s if len(s) <= limit else s[:limit] + " … (%d bytes)" % len(s)


class Server:
    def __init__(self, *args, record=False):
        self.err = open(os.path.join(tmp, "stderr-%d" % time.monotonic_ns()), "w+")
        self.p = subprocess.Popen([FC, "mcp", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, env=ENV)
        self.buf = b""
        self.next_id = 0
        self.record = record

    def send_raw(self, data):
        if self.record:
            transcript.append("→ " + short(data.rstrip(b"\n")))
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def send(self, msg):
        self.send_raw(json.dumps(msg).encode() + b"\n")

    def recv(self, timeout=240):
        """The next line from the server, decoded (None on timeout or EOF)."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if r:
                data = os.read(fd, 1 << 20)
                if not data:
                    return None
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        if self.record:
            transcript.append("← " + short(line))
        try:
            return json.loads(line)
        except ValueError:
            return {"not json": line.decode(errors="replace")}

    def request(self, method, params=None, timeout=240):
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        r = self.recv(timeout)
        if r is not None and r.get("id") != self.next_id:
            return {"wrong id": r}
        return r

    def call(self, tool, args=None, timeout=240):
        params = {"name": tool}
        if args is not None:
            params["arguments"] = args
        return self.request("tools/call", params, timeout)

    def initialize(self, version="2025-06-18"):
        r = self.request("initialize", {"protocolVersion": version, "capabilities": {},
                                        "clientInfo": {"name": "tests/mcp.py", "version": "1"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return r

    def close(self, timeout=120):
        """EOF on stdin; the exit status (None if it did not exit)."""
        self.p.stdin.close()
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self):
        self.err.seek(0)
        return self.err.read()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def result(r):
    """structuredContent of a successful tool result, else None."""
    if not r or "result" not in r or r["result"].get("isError"):
        return None
    return r["result"].get("structuredContent")


def error_code(r):
    return r.get("error", {}).get("code") if isinstance(r, dict) else None


def tool_error(r):
    """The text of an isError result, else None."""
    if r and "result" in r and r["result"].get("isError"):
        return r["result"]["content"][0]["text"]
    return None


subprocess.run([FC, "cleanup", "-q"], env=ENV, capture_output=True)
no_leaks("before the tests")

# a snapshot of our own, so that start restores (and the session is quick)
r = subprocess.run([FC, "-q", "snapshot", "create", "--name", SNAP], env=ENV, capture_output=True, text=True)
ok(r.returncode == 0, "snapshot %s created" % SNAP, r.stderr)

# ---- the whole session ----
srv = Server("--max-output", "65536", record=True)
try:
    # a request before initialize is refused; a version we do not speak gets ours
    r = srv.request("tools/list")
    ok(error_code(r) == -32600 and "initialize" in r["error"]["message"], "tools/list before initialize: -32600", r)
    r = srv.initialize("1999-01-01")
    ok(r and r.get("result", {}).get("protocolVersion") == "2025-06-18",
       "initialize with an unknown version: the server answers with 2025-06-18", r)
    res = r["result"] if r and "result" in r else {}
    ok("tools" in res.get("capabilities", {}) and res.get("serverInfo", {}).get("name") == "fireclaw",
       "initialize: tools capability and serverInfo", res)
    r = srv.request("ping")
    ok(r and r.get("result") == {}, "ping answers {}", r)

    r = srv.request("tools/list")
    tools = {t["name"]: t for t in (r or {}).get("result", {}).get("tools", [])}
    ok(sorted(tools) == sorted(["run", "start", "exec", "write_file", "read_file", "stop", "list"]),
       "tools/list names the seven tools", sorted(tools))
    for name, t in sorted(tools.items()):
        s = t.get("inputSchema")
        try:
            jsonschema.validators.validator_for(s, default=jsonschema.Draft202012Validator).check_schema(s)
            jsonschema.Draft7Validator.check_schema(s)
            valid = s.get("type") == "object" and bool(t.get("description"))
            why = ""
        except Exception as e:  # noqa: BLE001 - any failure is the test's finding
            valid, why = False, e
        ok(valid, "tool %s: inputSchema is a valid JSON Schema (draft 2020-12 and 7) for an object" % name, why)

    r = srv.call("start", {"snapshot": SNAP})
    st = result(r)
    ok(st and st.get("boot") == "snapshot" and st.get("id"), "start (snapshot %s): an id, restored" % SNAP, r)
    sid = st["id"] if st else "none"
    ok(len(netns()) == 1, "start: the sandbox's namespace exists while it runs", netns())

    r = srv.call("exec", {"id": sid, "command": ["sh", "-c", 'printf "%s|" "$@"; cat', "sh", "a b", "$HOME", "'"],
                          "stdin": "from stdin"})
    x = result(r)
    ok(x and x["stdout"] == "a b|$HOME|'|from stdin" and x["exit_code"] == 0,
       "exec argv: every argument arrives as it is, stdin too", r)
    r = srv.call("exec", {"id": sid, "command": "echo out; echo err >&2; echo $GREETING; exit 3",
                          "env": {"GREETING": "hi there"}})
    x = result(r)
    ok(x and x["exit_code"] == 3 and x["stdout"] == "out\nhi there\n" and x["stderr"] == "err\n",
       "exec shell string: exit code 3, stdout, stderr, env", r)
    r = srv.call("exec", {"id": sid, "command": "sleep 30", "timeout": 1})
    x = result(r)
    ok(x and x["exit_code"] == 124 and x["timed_out"] is True, "exec timeout: exit_code 124, timed_out", r)
    r = srv.call("exec", {"id": sid, "command": "head -c 200000 /dev/zero | tr '\\0' x; printf '\\377' >&2"})
    x = result(r)
    ok(x and len(x["stdout"]) == 65536 and x["stdout_truncated"] is True and x["stderr_truncated"] is False,
       "exec output over --max-output: capped at 64 KiB, stdout_truncated", short(json.dumps(r)))
    ok(x and x.get("stderr_base64") == "/w==" and x["stderr"] == "\ufffd",
       "exec output that is not UTF-8: U+FFFD in stderr, exact bytes in stderr_base64", x and x.get("stderr"))

    r = srv.call("write_file", {"id": sid, "path": "/opt/new/dir/hello.sh", "content": "#!/bin/sh\necho hello $1\n",
                                "mode": "0750"})
    w = result(r)
    ok(w and w["bytes"] == 24, "write_file text: parent directories made, 24 bytes", r)
    r = srv.call("exec", {"id": sid, "command": "/opt/new/dir/hello.sh world; stat -c %a /opt/new/dir/hello.sh"})
    x = result(r)
    ok(x and x["stdout"] == "hello world\n750\n", "the file written runs, with mode 750", r)
    binary = bytes(range(256)) * 4
    r = srv.call("write_file", {"id": sid, "path": "bin.dat", "content": base64.b64encode(binary).decode(),
                                "base64": True})
    ok(result(r) and result(r)["bytes"] == 1024, "write_file base64: 1024 bytes", r)
    r = srv.call("read_file", {"id": sid, "path": "/root/bin.dat"})
    f = result(r)
    ok(f and f["encoding"] == "base64" and base64.b64decode(f["content"]) == binary and f["truncated"] is False,
       "read_file of a binary file (relative write went to /root): base64, byte for byte", short(json.dumps(r)))
    r = srv.call("read_file", {"id": sid, "path": "/opt/new/dir/hello.sh"})
    f = result(r)
    ok(f and f["encoding"] == "utf-8" and f["content"] == "#!/bin/sh\necho hello $1\n", "read_file of text", r)
    r = srv.call("read_file", {"id": sid, "path": "/root/bin.dat", "max_bytes": 10})
    f = result(r)
    got = f and (base64.b64decode(f["content"]) if f["encoding"] == "base64" else f["content"].encode())
    ok(f and f["truncated"] is True and got == binary[:10] and f["bytes"] == 10,
       "read_file max_bytes 10: the first 10 bytes, truncated", r)
    r = srv.call("read_file", {"id": sid, "path": "/no/such/file"})
    ok(tool_error(r) and "no such file" in tool_error(r), "read_file of a missing file: isError, says so", r)
    r = srv.call("write_file", {"id": sid, "path": "/etc/passwd/x", "content": "x"})
    ok(tool_error(r) and "/etc/passwd/x" in tool_error(r) and "exit status" not in tool_error(r),
       "write_file below a regular file: isError with the guest's reason", r)
    r = srv.call("read_file", {"id": sid, "path": "/etc"})
    ok(tool_error(r) and "directory" in tool_error(r), "read_file of a directory: isError, says so", r)

    ok(tools["read_file"].get("annotations", {}).get("readOnlyHint") is True and
       tools["stop"].get("annotations", {}).get("destructiveHint") is True,
       "tools/list: annotations (read_file read-only, stop destructive)", tools["stop"])

    r = srv.call("list")
    ls = result(r)
    ok(ls and [b["id"] for b in ls["sandboxes"]] == [sid], "list shows the sandbox", r)

    r = srv.call("run", {"command": ["sh", "-c", 'echo "$X:$(cat)"; uname -s'], "stdin": "in", "env": {"X": "x1"}})
    x = result(r)
    ok(x and x["stdout"] == "x1:in\nLinux\n" and x["exit_code"] == 0 and x["boot"] in ("snapshot", "cold"),
       "run: one-shot with stdin and env", r)
    ok(len(netns()) == 1, "run: its VM is gone again, the session's stays", netns())

    # a guest that ends its own VM: exec says so, stop still cleans up
    st2 = result(srv.call("start", {"snapshot": SNAP}))
    sid2 = st2["id"] if st2 else "none"
    r = srv.call("exec", {"id": sid2, "command": "reboot -f", "timeout": 60})
    ok(tool_error(r) or (result(r) or {}).get("exit_code") != 0, "exec that reboots its guest: no success", r)
    r = srv.call("exec", {"id": sid2, "command": "true"})
    ok(tool_error(r) and "exited" in tool_error(r), "the next exec: isError, the VMM exited", r)
    r = srv.call("stop", {"id": sid2})
    ok(result(r) == {"id": sid2, "stopped": True}, "stop of a VM that ended by itself", r)
    ok(len(netns()) == 1, "… and its namespace is gone", netns())

    r = srv.call("stop", {"id": sid})
    ok(result(r) == {"id": sid, "stopped": True}, "stop", r)
    r = srv.call("list")
    ok(result(r) == {"sandboxes": []}, "list is empty after stop", r)
    r = srv.call("exec", {"id": sid, "command": "true"})
    ok(tool_error(r) and "no sandbox" in tool_error(r), "exec in a stopped sandbox: isError", r)
    no_leaks("after stop, with the server still up")

    # a sandbox left running goes at EOF
    st = result(srv.call("start", {"snapshot": SNAP}))
    ok(st and len(netns()) == 1, "a second sandbox, left running", netns())
    rc = srv.close()
    ok(rc == 0, "EOF on stdin: the server exits 0", "exit %s; stderr: %s" % (rc, srv.stderr()))
    no_leaks("after EOF, with a sandbox left running")
finally:
    srv.kill()

# ---- bad requests: a JSON-RPC error each, and the server answers the next one ----
srv = Server("--max-message", str(1 << 20))
try:
    srv.initialize()
    bad = [
        (b"{not json\n", -32700, "invalid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","x":"\xff"}\n', -32700, "bytes that are not UTF-8"),
        (b'"a string"\n', -32600, "a string, not an object"),
        (b"42\n", -32600, "a number, not an object"),
        (b"null\n", -32600, "null"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]\n', -32600, "a batch (removed in 2025-06-18)"),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}\n', -32600, "jsonrpc 1.0"),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}\n', -32600, "id null"),
        (b'{"jsonrpc":"2.0","id":1,"method":7}\n', -32600, "method not a string"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":[1]}\n', -32602, "params an array"),
        (b'{"jsonrpc":"2.0","id":9,"method":"resources/list"}\n', -32601, "unknown method"),
    ]
    for line, code, what in bad:
        srv.send_raw(line)
        r = srv.recv()
        ok(error_code(r) == code and "message" in r["error"], "%s: error %d" % (what, code), r)
        if what == "unknown method":
            ok(r.get("id") == 9, "unknown method: the error carries the request's id", r)
        p = srv.request("ping")
        ok(p and p.get("result") == {}, "… and the server still answers (%s)" % what, p)
    # a notification gets no answer, whatever it is
    srv.send({"jsonrpc": "2.0", "method": "notifications/whatever"})
    srv.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
    p = srv.request("ping")
    ok(p and p.get("result") == {}, "notifications (even unknown ones) are not answered", p)

    schemas = {t["name"]: t["inputSchema"] for t in srv.request("tools/list")["result"]["tools"]}
    r = srv.call("no_such_tool", {})
    ok(error_code(r) == -32602 and "no_such_tool" in r["error"]["message"], "unknown tool: -32602 naming it", r)
    wrong = [
        ("exec", {"id": 5, "command": "true"}, "id a number"),
        ("exec", {"id": "x", "command": 5}, "command a number"),
        ("exec", {"id": "x", "command": []}, "command an empty argv"),
        ("exec", {"id": "x", "command": ["a", 1]}, "argv with a number"),
        ("exec", {"id": "x", "command": "true", "timeout": "10"}, "timeout a string"),
        ("exec", {"id": "x", "command": "true", "env": {"A": 1}}, "env value a number"),
        ("exec", {"id": "x", "command": "true", "bogus": True}, "an unknown argument"),
        ("exec", {"command": "true"}, "missing id"),
        ("write_file", {"id": "x", "path": "/a"}, "write_file without content"),
        ("read_file", {"id": "x", "path": "/a", "max_bytes": 1.5}, "max_bytes not an integer"),
        ("run", {}, "run without command"),
        ("start", {"image": 3}, "image a number"),
    ]
    for tool, args, what in wrong:
        schema_says = jsonschema.Draft202012Validator(schemas[tool]).is_valid(args)
        r = srv.call(tool, args)
        ok(not schema_says and error_code(r) == -32602, "%s: -32602, as the inputSchema says" % what, r)
    r = srv.request("tools/call", {"name": "exec", "arguments": "x"})
    ok(error_code(r) == -32602, "arguments not an object: -32602", r)
    for tool, args, what in [("exec", {"id": "x", "command": "true", "env": {"A-B": "1"}}, "an env name with '-'"),
                             ("write_file", {"id": "x", "path": "/a", "content": "", "mode": "9999"}, "mode not octal"),
                             ("write_file", {"id": "x", "path": "/a", "content": "!!", "base64": True}, "bad base64")]:
        r = srv.call(tool, args)
        ok(error_code(r) == -32602, "%s: -32602" % what, r)
    for tool in ("exec", "write_file", "read_file", "stop"):
        args = {"id": "nosuch", "command": "true", "path": "/a", "content": ""}
        args = {k: v for k, v in args.items() if k in schemas[tool]["properties"]}
        r = srv.call(tool, args)
        ok(tool_error(r) and "no sandbox 'nosuch'" in tool_error(r),
           "%s with an unknown sandbox id: isError result naming it" % tool, r)
    r = srv.call("start", {"image": "no-such-image"})
    ok(tool_error(r) and "no-such-image" in tool_error(r), "start with an unknown image: isError", r)
    r = srv.call("start", {"image": "../etc"})
    ok(tool_error(r) is not None, "start with an image name that is a path: isError", r)

    # a 20 MiB line: an error, the server stays up and never holds it whole
    big = b'{"jsonrpc":"2.0","id":77,"method":"tools/call","params":{"name":"run","arguments":{"command":"' + \
        b"x" * (20 << 20) + b'"}}}\n'
    srv.send_raw(big)
    r = srv.recv()
    ok(error_code(r) == -32600 and "limit" in r["error"]["message"], "a 20 MiB line: -32600, over the limit", r)
    p = srv.request("ping")
    ok(p and p.get("result") == {}, "… and the server still answers", p)
    ok(srv.p.poll() is None, "the server never crashed", srv.stderr())
    rc = srv.close()
    ok(rc == 0, "EOF: exit 0", srv.stderr())
finally:
    srv.kill()
no_leaks("bad requests")

# ---- stdout is the protocol's alone: a stray print (here in a copy of the recipe) goes to stderr ----
rdir = os.path.join(tmp, "recipes")
os.makedirs(rdir)
src = open(os.path.join(os.path.dirname(TESTS), "recipes", "mcp.lua")).read()
marker = "function METHODS.ping()\n"
with open(os.path.join(rdir, "mcp.lua"), "w") as f:
    f.write(src.replace(marker, marker + '\tprint("STRAY LINE") io.write("STRAY WRITE\\n") io.stdout:flush()\n'))
srv = Server()
srv.p.kill()
srv.p.wait()
srv.p = subprocess.Popen([FC, "--recipes", rdir, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=srv.err, env=ENV)
try:
    ok(marker in src, "the recipe copy has the stray print")
    srv.initialize()
    p = srv.request("ping")
    ok(p and p.get("result") == {}, "a ping that prints: stdout still carries only the answer", p)
    rc = srv.close()
    ok(rc == 0 and "STRAY LINE" in srv.stderr() and "STRAY WRITE" in srv.stderr(),
       "… and the stray lines went to stderr", srv.stderr())
finally:
    srv.kill()

# ---- limits and SIGTERM mid-session ----
srv = Server("--max-sandboxes", "2")
try:
    srv.initialize()
    ids = [result(srv.call("start", {"snapshot": SNAP})) for _ in range(2)]
    ok(all(ids) and len(netns()) == 2, "two sandboxes started", ids)
    r = srv.call("start", {"snapshot": SNAP})
    ok(tool_error(r) and "--max-sandboxes" in tool_error(r), "a third one over --max-sandboxes 2: isError", r)
    ok(len(netns()) == 2, "… and no VM was made for it", netns())
    srv.p.send_signal(signal.SIGTERM)
    try:
        rc = srv.p.wait(120)
    except subprocess.TimeoutExpired:
        rc = None
    ok(rc == 128 + signal.SIGTERM, "SIGTERM: the server exits 143", "exit %s; %s" % (rc, srv.stderr()))
finally:
    srv.kill()
no_leaks("SIGTERM with two sandboxes up")

# ---- the client stops reading: the next answer fails, the server cleans up and exits ----
srv = Server()
try:
    srv.initialize()
    st = result(srv.call("start", {"snapshot": SNAP}))
    ok(st and len(netns()) == 1, "a sandbox before the client closes its end of stdout", netns())
    srv.p.stdout.close()
    srv.send({"jsonrpc": "2.0", "id": 50, "method": "ping"})
    try:
        rc = srv.p.wait(120)
    except subprocess.TimeoutExpired:
        rc = None
    ok(rc == 0, "stdout closed: the server exits 0", "exit %s; %s" % (rc, srv.stderr()))
finally:
    srv.kill()
no_leaks("stdout closed by the client")

# ---- SIGTERM while a command runs: the call is cut short, the sandbox destroyed ----
srv = Server()
try:
    srv.initialize()
    st = result(srv.call("start", {"snapshot": SNAP}))
    ok(st is not None, "a sandbox for the interrupted exec", st)
    sid = st["id"] if st else "none"
    # the guest says on its console (a file on the host) when the command runs
    srv.send({"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "exec", "arguments": {
        "id": sid, "command": "echo MCP-EXEC-RUNNING > /dev/console; sleep 600", "timeout": 900}}})
    console = os.path.join(ENV["FIRECLAW_RUN"], "vms", sid, "console.log")
    deadline = time.monotonic() + 120
    seen = False
    while not seen and time.monotonic() < deadline and srv.p.poll() is None:
        try:
            with open(console, "rb") as f:
                seen = b"MCP-EXEC-RUNNING" in f.read()
        except OSError:
            pass
        if not seen:
            select.select([], [], [], 0.05)  # poll the file (bounded by the deadline)
    ok(seen, "the command runs in the guest (its console says so)")
    srv.p.send_signal(signal.SIGTERM)
    try:
        rc = srv.p.wait(120)  # far less than the command's 600 s
    except subprocess.TimeoutExpired:
        rc = None
    ok(rc == 128 + signal.SIGTERM, "SIGTERM during exec: the server stops the call and exits 143",
       "exit %s; %s" % (rc, srv.stderr()))
finally:
    srv.kill()
no_leaks("SIGTERM during an exec")

# ---- SIGKILL: the VMMs die with the server, cleanup reaps the records ----
srv = Server()
try:
    srv.initialize()
    st = result(srv.call("start", {"snapshot": SNAP}))
    ok(st and len(netns()) == 1, "a sandbox before SIGKILL", netns())
finally:
    srv.kill()
r = subprocess.run([FC, "cleanup"], env=ENV, capture_output=True, text=True)
ok(r.returncode == 0, "fireclaw cleanup after the SIGKILLed server", r.stdout + r.stderr)
no_leaks("SIGKILL + cleanup")

subprocess.run([FC, "-q", "snapshot", "rm", SNAP], env=ENV, capture_output=True)
if os.environ.get("FIRECLAW_MCP_TRANSCRIPT"):
    with open(os.environ["FIRECLAW_MCP_TRANSCRIPT"], "w") as f:
        f.write("\n".join(transcript) + "\n")
subprocess.run(["rm", "-rf", tmp])
done()
