"""Interactive sessions through a real pseudo-terminal: exec -it and shell into a kept VM
(the guest sees a TTY of the terminal's size, a resize reaches it, Ctrl-C stops the guest
program and not fireclaw, the exit status comes back, the terminal is restored), run -it,
and run without -t on a terminal saying that stdin is not forwarded. Prints TAP."""
import fcntl, json, os, struct, subprocess, sys, termios
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from ptyproc import PtyReader
from tap import done, ok

FC = os.environ.get("FIRECLAW", "./fireclaw")
tag = os.environ.get("FIRECLAW_TEST_TAG", "")
run_dir = "/tmp/fc-tty-%s-%d" % (tag, os.getpid())
env = dict(os.environ, FIRECLAW_VMM="qemu", FIRECLAW_RUN=run_dir,
           FIRECLAW_NETNS_PREFIX="fc-%stty" % tag, TERM="xterm")


def fc(*args, **kw):
    return subprocess.run([FC, *args], env=env, capture_output=True, text=True, timeout=kw.get("timeout", 120))


def winsize(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Term(PtyReader):
    """fireclaw on the slave side of a new pty, as its controlling terminal."""

    def __init__(self, argv, rows=30, cols=100, exec_mode="auto"):
        self.master, self.slave = os.openpty()
        winsize(self.master, rows, cols)
        self.before = termios.tcgetattr(self.slave)

        def ctty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.p = subprocess.Popen([FC, *argv], env=dict(env, FIRECLAW_EXEC=exec_mode), stdin=self.slave, stdout=self.slave,
                                  stderr=self.slave, preexec_fn=ctty, close_fds=True)
        super().__init__(self.master, timeout=20)

    def send(self, s):
        os.write(self.master, s.encode())

    def wait(self, timeout=30):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return None

    def restored(self):
        return termios.tcgetattr(self.slave) == self.before

    def close(self):
        os.close(self.master)
        os.close(self.slave)


def leaks():
    out = subprocess.run(["bash", "-c", 'source "$FIRECLAW_TESTS/lib/leaks.sh"; leaks'], env=env,
                         capture_output=True, text=True)
    return out.stdout.strip()


print("TAP version 13")
r = fc("start", "--name", "tty1", "--ttl", "10m")
ok(r.returncode == 0, "start a kept VM", r.stderr)
vid = r.stdout.strip()

# exec -it over each channel (the agent: the default; SSH): size, resize, Ctrl-C, exit
# status, terminal restored
for mode, want in (("auto", "agent"), ("ssh", "ssh")):
    t = Term(["exec", "-it", "tty1", "--", "sh"], rows=30, cols=100, exec_mode=mode)
    t.send("[ -n \"$SSH_CONNECTION\" ] && c=ssh || c=agent; echo CH=$c.\r")
    out = t.read_until(r"CH=(ssh|agent)\.")
    ok(out is not None and "CH=" + want in out, "exec -it (%s): over the %s" % (mode, want), repr(out))
    t.send("PS1='P> '; stty size\r")
    out = t.read_until(r"\d+ \d+\s*\r?\n.*P> ")
    ok(out is not None and "30 100" in out, "exec -it (%s):" % mode + " the guest's TTY has the terminal's size (30x100)", repr(out))
    winsize(t.master, 40, 120)  # the kernel sends fireclaw SIGWINCH
    t.send("stty size\r")
    out = t.read_until(r"40 120|\d+ \d+\s*\r?\n.*P> ")
    ok(out is not None and "40 120" in out, "exec -it (%s):" % mode + " a resize (SIGWINCH) reaches the guest (40x120)", repr(out))
    t.send("test -t 0 && echo IS-A-TTY\r")
    ok(t.read_until("IS-A-TTY\r?\n") is not None, "exec -it (%s):" % mode + " the guest's stdin is a terminal")
    t.send("sh -c 'echo sleep-$((2+3)); exec sleep 300'\r")
    t.read_until("sleep-5")
    t.send("\x03")
    t.send("echo after-sleep rc=$?\r")
    out = t.read_until(r"after-sleep rc=\d+")
    ok(out is not None and "rc=130" in out, "exec -it (%s):" % mode + " Ctrl-C stops the guest program (status 130), not fireclaw",
       repr(out) + repr(t.buf))
    ok(t.p.poll() is None, "fireclaw is still running after Ctrl-C (%s)" % mode)
    t.send("exit 7\r")
    st = t.wait()
    ok(st == 7, "exec -it (%s):" % mode + " the shell's exit status 7 comes back", st)
    ok(t.restored(), "the terminal settings are restored after exec -it (%s)" % mode)
    t.close()

# shell: a login shell on the terminal
t = Term(["shell", "tty1"])
t.send("[ -n \"$SSH_CONNECTION\" ] && c=ssh || c=agent; echo CH=$c.\r")
out = t.read_until(r"CH=(ssh|agent)\.")
ok(out is not None and "CH=agent" in out, "shell: over the agent", repr(out))
t.send("echo in-shell-$((6*7)); exit 3\r")
ok(t.read_until("in-shell-42") is not None, "shell: commands run in the guest")
ok(t.wait() == 3, "shell: exit status comes back")
ok(t.restored(), "the terminal is restored after shell")
t.close()

# an interrupt of fireclaw itself (SIGTERM) restores the terminal too
t = Term(["exec", "-it", "tty1", "--", "sh"])
t.send("echo ready-$((1+1))\r")
t.read_until("ready-2")
t.p.terminate()
st = t.wait()
ok(st is not None and st != 0, "SIGTERM ends exec -it", st)
ok(t.restored(), "the terminal is restored after SIGTERM")
t.close()

# a second signal exits at once (no cleanup): the terminal is restored first all the same
t = Term(["exec", "-it", "tty1", "--", "sh"])
t.send("echo ready-$((2+2))\r")
t.read_until("ready-4")
t.p.terminate()
os.kill(t.p.pid, 2)  # SIGINT: another signal (a second SIGTERM might merge with the first)
st = t.wait()
ok(st is not None and st != 0, "SIGTERM then SIGINT end exec -it at once", st)
ok(t.restored(), "the terminal is restored after a second signal too")
t.close()

# exec without -t on a terminal: one line says stdin is not forwarded
t = Term(["exec", "tty1", "--", "cat"])
out = t.read_until("not forwarded")
ok(out is not None, "exec without -i on a terminal says stdin is not forwarded", repr(t.buf))
ok(t.wait() == 0, "... and cat ends at once (exit 0)")
t.close()

r = fc("stop", "tty1")
ok(r.returncode == 0, "stop", r.stderr)
l = leaks()
ok(l == "", "nothing left behind: exec -it, shell", l)

# run -it and run -- sh on a terminal
t = Term(["run", "-it", "--no-snapshot", "--", "sh", "-c",
          "test -t 0 && test -t 1 && echo RUN-TTY; [ -z \"$SSH_CONNECTION\" ] && echo RUN-AGENT; stty size"],
         rows=33, cols=91)
out = t.read_until(r"33 91")
ok(out is not None and "RUN-TTY" in out, "run -it: the command has a TTY of the terminal's size", repr(t.buf))
ok(out is not None and "RUN-AGENT" in out, "run -it: over the agent", repr(out))
ok(t.wait(60) == 0, "run -it exits 0")
ok(t.restored(), "the terminal is restored after run -it")
t.close()
t = Term(["run", "--", "sh"])
out = t.read_until("not forwarded", timeout=60)
ok(out is not None, "run -- sh on a terminal says stdin is not forwarded (no silent exit)", repr(t.buf))
t.wait(60)
t.close()
l = leaks()
ok(l == "", "nothing left behind: run -it", l)
subprocess.run(["rm", "-rf", run_dir])
done()
