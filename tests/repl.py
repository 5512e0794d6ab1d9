"""The REPL, driven through a pseudo-terminal: expressions, multi-line input, pretty
printing, errors, module globals, Ctrl-C, history. Prints TAP."""
import os, pty, re, select, shutil, sys, tempfile, termios, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from ptyproc import PtyReader
from tap import done, ok

FC = os.environ.get("FIRECLAW", "./fireclaw")


class Repl(PtyReader):
    def __init__(self, home):
        env = dict(os.environ, HOME=home, TERM="dumb")
        self.pid, fd = pty.fork()
        if self.pid == 0:
            os.execve(FC, [FC], env)
        super().__init__(fd, timeout=10)

    def editing(self, timeout=5):
        """Wait until libedit reads keys (the terminal out of canonical mode): it prints the
        prompt first and only then leaves it, and a ^D typed in between is taken by the
        canonical line discipline as an end of file, then read by libedit as a NUL byte
        (a quoted insert: the ^D after it is inserted, not an end of file). A person cannot
        type within those microseconds; this harness can. tcgetattr on the master side
        reads the terminal's (the slave's) modes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if not termios.tcgetattr(self.fd)[3] & termios.ICANON:
                    return True
            except termios.error:
                return False
            select.select([], [], [], 0.002)
        return False

    def send(self, line):
        self.editing()
        os.write(self.fd, line.encode() + b"\r")

    def ask(self, line, prompt=r"fireclaw> $"):
        self.send(line)
        return self.read_until(prompt)

    def close(self):
        # Ctrl-D once libedit reads keys (editing()); sent again each second until the
        # REPL is gone
        end = time.monotonic() + 10
        next_send = 0
        while time.monotonic() < end:
            if time.monotonic() >= next_send and self.editing(0.5):
                try:
                    os.write(self.fd, b"\x04")
                except OSError:
                    pass
                next_send = time.monotonic() + 1
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            # read only what is there: a blocking read would wait forever if the ^D
            # was lost and the REPL prints nothing more
            if select.select([self.fd], [], [], 0.05)[0]:
                try:
                    os.read(self.fd, 4096)
                except OSError:
                    pass
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        return None


home = tempfile.mkdtemp()
try:
    r = Repl(home)
    banner = r.read_until(r"fireclaw> $")
    ok(banner is not None and "fireclaw" in banner, "banner and prompt", repr(banner))
    # the globals README promises, listed by the banner, exist
    promised = ["sandbox", "cli", "vm", "net", "rootfs", "snapshot", "ssh", "json", "state"]
    listed = re.search(r"Globals: ([a-z ]+)\.", banner or "")
    ok(listed is not None and all(g in listed.group(1).split() for g in promised),
       "the banner lists the globals, sandbox and cli among them", repr(banner))
    out = r.ask("type(sandbox.new) .. type(cli.parse) .. type(snapshot.load)")
    ok(out is not None and '"functionfunctionfunction"' in out, "sandbox, cli and snapshot are globals", repr(out))
    out = r.ask('"a\\nb\\tc\\0"')
    ok(out is not None and '"a\\nb\\tc\\000"\r\n' in out.replace("\r\r", "\r"),
       "a string prints escaped on one line", repr(out))
    out = r.ask('{s = "x\\ny"}')
    ok(out is not None and 's = "x\\ny"\r\n' in out.replace("\r\r", "\r"), "strings in tables too", repr(out))
    out = r.ask("1+1")
    ok(out is not None and "\n2\r\n" in out.replace("\r\r", "\r"), "a bare expression prints its value", repr(out))
    out = r.ask("=math.max(3, 9)")
    ok(out is not None and "9" in out, "=expr prints", repr(out))
    out = r.send("function double(x)") or r.read_until(r">> $")
    ok(out is not None, "an incomplete chunk asks for more", repr(out))
    r.send("  return x * 2")
    r.read_until(r">> $")
    out = r.ask("end")
    out = r.ask("double(21)")
    ok(out is not None and "42" in out, "multi-line function defined and called", repr(out))
    out = r.ask('{a = {1, 2}, name = "x"}')
    ok(out is not None and re.search(r'a = \{\s+1,\s+2\s+\},\s+name = "x"', out.replace("\r", "")) is not None,
       "tables are pretty-printed", repr(out))
    out = r.ask("t = {} t.self = t")
    out = r.ask("t")
    ok(out is not None and "<cycle" in out, "cycles are marked", repr(out))
    out = r.ask("big = {} for i = 1, 200 do big[i] = i end")
    out = r.ask("big")
    ok(out is not None and "150 more" in out, "long tables are elided", repr(out))
    out = r.ask('error("oops", 0)')
    ok(out is not None and "fireclaw: oops" in out, "an error is reported and the REPL goes on", repr(out))
    out = r.ask("json.encode{1,2}")
    ok(out is not None and '"[1,2]"' in out, "fireclaw modules are globals", repr(out))
    r.send("print('loop' .. 'ing') while true do require('fireclaw.runtime').sleep(1) end")
    r.read_until(r"looping\r\n")
    os.write(r.fd, b"\x03")
    out = r.read_until(r"fireclaw> $")
    ok(out is not None and "interrupted by SIGINT" in out, "Ctrl-C interrupts the running chunk, not the REPL", repr(out))
    out = r.ask("40 + 2")
    ok(out is not None and "42" in out, "the REPL still works after Ctrl-C", repr(out))
    status = r.close()
    ok(status == 0, "Ctrl-D exits 0", repr(status))
    hist = os.path.join(home, ".local/state/fireclaw/history")
    text = open(hist, errors="replace").read() if os.path.exists(hist) else ""
    ok("double(21)" in text.replace("\\040", " "), "history is saved", text[-300:])
    r2 = Repl(home)
    r2.read_until(r"fireclaw> $")
    r2.editing()
    os.write(r2.fd, b"\x1b[A")  # up arrow: the last line from the saved history
    r2.send("")
    out = r2.read_until(r"fireclaw> $")
    ok(out is not None and "42" in out, "history is loaded by the next REPL", repr(out))
    r2.close()
finally:
    shutil.rmtree(home)
# the history is never written (or read) through a symlink, and its directory is 0700
home = tempfile.mkdtemp()
try:
    sdir = os.path.join(home, ".local/state/fireclaw")
    os.makedirs(sdir, mode=0o700)
    target = os.path.join(home, "precious")
    with open(target, "w") as f:
        f.write("precious\n")
    hist = os.path.join(sdir, "history")
    os.symlink(target, hist)
    r = Repl(home)
    r.read_until(r"fireclaw> $")
    out = r.ask("6 * 7")
    ok(out is not None and "42" in out, "REPL with a symlink at the history path runs", repr(out))
    status = r.close()
    ok(status == 0, "... exits 0", repr(status))
    ok(open(target).read() == "precious\n", "the symlink's target is untouched")
    ok(not os.path.islink(hist) and "6 * 7" in open(hist, errors="replace").read().replace("\\040", " "),
       "the history replaced the symlink with a file of its own")
    ok(os.stat(hist).st_mode & 0o777 == 0o600, "the history file is 0600", oct(os.stat(hist).st_mode))
    # the state directory itself a symlink elsewhere: no history at all
    shutil.rmtree(sdir)
    elsewhere = os.path.join(home, "elsewhere")
    os.mkdir(elsewhere, 0o700)
    os.symlink(elsewhere, sdir)
    r = Repl(home)
    r.read_until(r"fireclaw> $")
    r.ask("1 + 1")
    r.close()
    ok(os.listdir(elsewhere) == [], "a symlinked history directory is not written into", repr(os.listdir(elsewhere)))
    # a fresh HOME: the directories are created 0700
    home3 = os.path.join(home, "fresh")
    os.mkdir(home3, 0o755)
    r = Repl(home3)
    r.read_until(r"fireclaw> $")
    r.close()
    st = os.stat(os.path.join(home3, ".local/state/fireclaw"))
    ok(st.st_mode & 0o777 == 0o700, "the history directory is created 0700", oct(st.st_mode))
finally:
    shutil.rmtree(home)
done()
