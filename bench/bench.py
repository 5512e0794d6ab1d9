#!/usr/bin/python3
"""fireclaw benchmark: measures this machine and writes BENCHMARKS.md.

Run through `make bench` (bench/run.sh). Stdlib only; Debian's /usr/bin/python3.

  1. `fireclaw run -- true` restored from the snapshot and cold (--no-snapshot), each run
     interleaved with the same run done by hand with plain tools (bench/baseline.sh).
  2. fireclaw's own cost per run: CPU time and peak RSS of the fireclaw process alone
     (bench/rusage.c, LD_PRELOAD: getrusage(RUSAGE_SELF) at exit, the VMM excluded), and
     the start-up of `fireclaw -e ''` (hyperfine), and the restore's memory copy on its own
     (bench/memcopy.lua: the snapshot's memory into a memfd, as a QEMU restore does), and
     with a QEMU >= 8.2 from tools/qemu-next.sh (when it has fetched one) restored runs
     that map the snapshot's memory against the same runs copying it, interleaved.
  3. The stage breakdown of a run, from fireclaw's own timestamps (--json stages, -v).
  4. Concurrency: 1, 2, 4, 8 restored runs at once.
  5. Throughput: sequential restored runs per minute.
  6. Network policy: restored runs with --net none, --net nat, --allow and -p, interleaved:
     what each mode adds (the VMs' uplink is a namespace of the bench's own, never the host).

Environment: BENCH_RESTORE_RUNS (30), BENCH_COLD_RUNS (15), BENCH_CONC_ROUNDS (10),
BENCH_SEQ_RUNS (20), BENCH_NET_RUNS (10), BENCH_STARTUP_RUNS (200), BENCH_STAGECPU_RUNS (10), BENCH_MEMCOPY_RUNS (30),
BENCH_NEXT_RUNS (10 pairs), BENCH_OUT
(BENCHMARKS.md); counts below 10 are raised to 10 unless BENCH_QUICK=1 (a quick try),
BENCH_BASELINE_SNAPSHOT=own to give the baseline its own hand-made snapshot instead of
fireclaw's. FIRECLAW_QEMU runs both sides on another QEMU (e.g. tools/qemu-next.sh's, with
a FIRECLAW_STATE of its own: its snapshot is made by that QEMU). Everything it creates (namespaces fcb-<pid>-<n>, QEMU processes, files in a
temporary directory) is removed at the end and on SIGINT/SIGTERM.
"""
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FC = os.path.join(ROOT, "fireclaw")
BASELINE = os.path.join(ROOT, "bench", "baseline.sh")
STATE = os.environ.get("FIRECLAW_STATE", "/var/lib/fireclaw")
RUN_DIR = os.environ.get("FIRECLAW_RUN", "/run/fireclaw")
IMAGE = "default"
# the QEMU both sides run: fireclaw's choice (FIRECLAW_QEMU, else the one on PATH)
QEMU = shutil.which(os.environ.get("FIRECLAW_QEMU") or "qemu-system-x86_64")
QEMU = QEMU and os.path.abspath(QEMU)


def qemu_data_dir(qemu):
    """-L for a QEMU outside /usr (tools/qemu-next.sh unpacks one), as fireclaw gives it:
    its own firmware, not the system QEMU's. None for the system's."""
    m = re.match(r"^(/.+)/bin/[^/]+$", qemu or "")  # the driver's rule (qemu.data_dir)
    if not m or m.group(1) in ("/usr", "/usr/local"):
        return None
    d = m.group(1) + "/share/qemu"
    return d if os.path.isdir(d) else None


def env_int(name, default, low=1):
    low = 1 if os.environ.get("BENCH_QUICK") else low
    v = int(os.environ.get(name, default))
    return max(v, low)


N_RESTORE = env_int("BENCH_RESTORE_RUNS", 30, 10)
N_COLD = env_int("BENCH_COLD_RUNS", 15, 10)
N_ROUNDS = env_int("BENCH_CONC_ROUNDS", 10, 1)
N_SEQ = env_int("BENCH_SEQ_RUNS", 20, 10)
N_NET = env_int("BENCH_NET_RUNS", 10, 10)
# the network modes of section 6: label, run options
NET_MODES = [("--net none (default)", []), ("--net nat", ["--net", "nat"]),
             ("--allow good.test --allow 10.0.0.0/8:443", ["--allow", "good.test", "--allow", "10.0.0.0/8:443"]),
             ("-p 127.0.0.1:PORT:8080 (none)", ["-p", "PORT:8080"])]
N_STARTUP = env_int("BENCH_STARTUP_RUNS", 200, 10)
N_STAGECPU = env_int("BENCH_STAGECPU_RUNS", 10, 10)
N_MEMCOPY = env_int("BENCH_MEMCOPY_RUNS", 30, 10)
N_NEXT = env_int("BENCH_NEXT_RUNS", 10, 10)
# the copy arm of the QEMU >= 8.2 runs: the driver's mapping switched off
NO_MAP = ["-e", 'require("fireclaw.vmm.qemu").MAP_VERSION = "999"']
LEVELS = [1, 2, 4, 8]
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "BENCHMARKS.md"))

TARGETS = {
    "restore_ratio": 0.8,
    "cold_ratio": 1.0,
    "cpu_ms": 10.0,
    "startup_ms": 5.0,
    "teardown_ms": 20.0,
}


class Fail(Exception):
    """A reason to stop, said in one line."""


class Interrupted(Exception):
    pass


# ---------------------------------------------------------------- processes we started

live = {}  # pid -> Popen, every child still running
live_lock = threading.Lock()
got_signal = []


def on_signal(sig, frame):
    got_signal.append(sig)
    raise Interrupted(signal.Signals(sig).name)


# fireclaw runs in a neutral directory, as a user's run does (the working directory is
# never on the recipe search path; this keeps it that way should that change)
CWD = ["/"]


def start(argv, env=None, stdin=subprocess.DEVNULL):
    p = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         cwd=CWD[0])
    with live_lock:
        live[p.pid] = p
    return p


def finish(p, timeout=None):
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.returncode is not None:
            with live_lock:
                live.pop(p.pid, None)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def run(argv, env=None, timeout=600):
    """Run a setup command (not timed); return (status, stdout, stderr)."""
    return finish(start(argv, env), timeout)


def stop_children():
    """End the children still running, by their pids only. After a SIGINT (a Ctrl-C reaches
    the whole process group) they are stopping by themselves: give them time; otherwise,
    and for the ones that do not stop, SIGTERM (fireclaw and baseline.sh clean up on it),
    SIGKILL as a last resort."""
    with live_lock:
        procs = list(live.values())
    if not procs:
        return
    if signal.SIGINT not in got_signal:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- QEMU command lines

QEMU_FLAGS = {"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S"}


def canon_argv(argv, fds):
    """QEMU words -> ({"-opt value"…}, {role: path}). File-valued options become their role;
    fds maps the VMM's descriptor numbers to what they are (readlink of /proc/PID/fd/N)."""
    out, files = [], {}

    def path_of(v):
        m = re.match(r"/proc/self/fd/(\d+)$", v)
        if m:
            t = fds.get(m.group(1))
            return t if t and t.startswith("/") else None
        return None if v.startswith("/dev/fdset/") else v

    words = argv[1:]
    i = 0
    while i < len(words):
        opt = words[i]
        val = None
        if opt not in QEMU_FLAGS and i + 1 < len(words):
            val = words[i + 1]
            i += 1
        i += 1
        if opt in ("-name", "-add-fd", "-chardev"):
            continue  # plumbing: descriptors, fd sets, the chardevs behind -serial / -mon
        if opt == "-serial":
            val = "<console file>"
        elif opt == "-qmp" or (opt == "-mon" and "mode=control" in (val or "")):
            opt, val = "-qmp", "<control socket>"
        elif opt in ("-kernel", "-initrd"):
            files[opt[1:]] = path_of(val)
            val = f"<{opt[1:]}>"
        elif opt == "-object" and "mem-path=" in val:
            files["ram file"] = path_of(re.search(r"mem-path=([^,]+)", val).group(1))
            val = re.sub(r"mem-path=[^,]+", "mem-path=<ram file>", val)
        elif opt == "-drive":
            val = re.sub(r"file=[^,]+", "file=<disk copy>", val)
        elif opt == "-blockdev":
            val = re.sub(r"filename=[^,]+", "filename=<file>", val)
        elif opt == "-netdev":
            val = re.sub(r"ifname=[^,]+,script=no,downscript=no|fd=\d+", "<tap0>", val)
        out.append(opt if val is None else f"{opt} {val}")
    return out, files


# The accepted difference in how the root disk reaches QEMU: the baseline copies the disk
# (`cp --sparse=always`) and gives QEMU the copy (-drive, raw); a fireclaw run that is not
# kept gives QEMU a qcow2 overlay on the golden disk instead (docs/DECISIONS.md), which
# QEMU reads through a raw node of its own (-blockdev ×4), the device being the same
# `virtio-blk-device,drive=root` with werror/rerror=report moved from the drive to it.
BASELINE_DISK = {"-drive id=root,if=none,format=raw,werror=report,rerror=report,file.locking=off,file=<disk copy>",
                 "-device virtio-blk-device,drive=root"}
OVERLAY_DISK = {"-blockdev driver=file,node-name=golden-file,filename=<file>,read-only=on,locking=off",
                "-blockdev driver=raw,node-name=golden,file=golden-file,read-only=on",
                "-blockdev driver=file,node-name=root-file,filename=<file>,locking=off",
                "-blockdev driver=qcow2,node-name=root,file=root-file,backing=golden",
                "-device virtio-blk-device,drive=root,werror=report,rerror=report"}
DISK_NOTE = ("the root disk: fireclaw gives QEMU a qcow2 overlay on the snapshot's (cold: the image's) disk, "
             "which QEMU gets read-only (-blockdev qcow2 over raw; werror/rerror=report on the device), where the "
             "baseline copies the disk and gives QEMU the copy (-drive raw)")


def accept_disk(a, b):
    """Drop the root disk's options from both command lines when they are exactly the
    accepted pair (the baseline's copy, fireclaw's overlay); returns the note, or None when
    fireclaw's disk options are anything else (then they count as differences)."""
    if OVERLAY_DISK <= set(a) and BASELINE_DISK <= set(b):
        a[:] = [x for x in a if x not in OVERLAY_DISK]
        b[:] = [x for x in b if x not in BASELINE_DISK]
        return DISK_NOTE
    return None


# ---------------------------------------------------------------- statistics

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_ms(x, nd=0):
    if x != x:  # nan
        return "–"
    return f"{x:.{nd}f}"


def summary(xs, nd=0, unit=" ms"):
    """'median (min–max)'"""
    if not xs:
        return "–"
    return f"{fmt_ms(med(xs), nd)}{unit} ({fmt_ms(min(xs), nd)}–{fmt_ms(max(xs), nd)})"


# ---------------------------------------------------------------- the bench itself

class Bench:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="fcb.", dir="/tmp")
        self.n = 0
        self.tag = str(os.getpid())
        self.t_start = time.monotonic()
        self.notes = []
        self.fc_env = dict(os.environ)
        CWD[0] = self.tmp

    # -- helpers

    def log(self, msg):
        el = time.monotonic() - self.t_start
        sys.stderr.write(f"bench [{el:5.0f} s] {msg}\n")
        sys.stderr.flush()

    def next_id(self):
        self.n += 1
        return f"{self.tag}-{self.n}"

    def cleanup(self):
        stop_children()
        # our namespaces only: fcb-<our pid>-<n>
        try:
            names = os.listdir("/run/netns")
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(f"fcb-{self.tag}-"):
                subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- one fireclaw run

    def fc_start(self, mode, extra=(), pre=()):
        """mode: restore, cold, or restore-ssh / cold-ssh (the same over SSH: --exec ssh).
        pre: fireclaw's own options (before `run`)."""
        n = self.next_id()
        ru = os.path.join(self.tmp, f"rusage-{n}")
        base, _, via = mode.partition("-")
        argv = [FC] + list(pre) + ["run", "-v", "--json"] + (["--no-snapshot"] if base == "cold" else []) + \
            (["--exec", via] if via else []) + list(extra) + ["--", "true"]
        env = dict(self.fc_env, LD_PRELOAD=self.rusage_so, FCB_RUSAGE_OUT=ru)
        t0 = time.perf_counter()
        p = start(argv, env)
        return {"p": p, "t0": t0, "ru": ru, "mode": mode}

    def fc_finish(self, h):
        st, out, err = finish(h["p"])
        wall = (time.perf_counter() - h["t0"]) * 1000
        r = {"wall": wall, "ok": False, "status": st, "err": err.strip().splitlines()[-3:],
             "mapped": "mapped privately" in err}
        try:
            j = json.loads(out)
        except ValueError:
            return r
        want = "snapshot" if h["mode"].startswith("restore") else "cold"
        r["boot"] = j.get("boot")
        r["ok"] = st == 0 and j.get("exit_code") == 0 and j.get("boot") == want
        if j.get("boot") != want:
            r["err"] = [f"expected a {want} run, fireclaw did a {j.get('boot')} run"] + r["err"]
        r["duration_ms"] = j.get("duration_ms")
        r["stages"] = [(s["name"], s["ms"]) for s in j.get("stages", [])]
        m = re.search(r"QMP ready in ([\d.]+) ms", err)
        r["qmp_ready"] = float(m.group(1)) if m else None
        try:
            with open(h["ru"]) as f:
                u, s, maxrss, hwm = (int(x) for x in f.read().split()[:4])
            r["cpu_user"], r["cpu_sys"], r["hwm"] = u / 1000, s / 1000, (hwm if hwm > 0 else maxrss)
        except (OSError, ValueError):
            pass
        return r

    def fc_run(self, mode, extra=(), pre=()):
        return self.fc_finish(self.fc_start(mode, extra, pre))

    # -- one baseline run

    def bl_run(self, mode):
        n = self.next_id()
        stages = os.path.join(self.tmp, f"stages-{n}")
        src = self.bl_snapdir if mode == "restore" else self.imgdir
        env = dict(os.environ, **self.bl_env[mode], FCB_STAGES=stages)
        t0 = time.perf_counter()
        st, out, err = finish(start([BASELINE, mode, n, src], env))
        wall = (time.perf_counter() - t0) * 1000
        r = {"wall": wall, "ok": st == 0, "status": st, "err": err.strip().splitlines()[-3:]}
        try:
            marks = []
            with open(stages) as f:
                for line in f:
                    k, v = line.split()
                    marks.append((k, float(v)))
            r["stages"] = [(marks[i][0], (marks[i][1] - marks[i - 1][1]) * 1000) for i in range(1, len(marks))]
            r["inside"] = (marks[-1][1] - marks[0][1]) * 1000
        except (OSError, ValueError, IndexError):
            pass
        return r

    # ------------------------------------------------------------ setup

    def setup(self):
        global FC
        if os.geteuid() != 0:
            raise Fail("needs root (network namespaces, taps)")
        for tool in ("socat", "hyperfine", "ssh", "ip", "cc"):
            if not shutil.which(tool):
                raise Fail(f"{tool} not found (tools/deps.sh installs it)")
        if not QEMU:
            raise Fail(f"{os.environ.get('FIRECLAW_QEMU') or 'qemu-system-x86_64'} not found "
                       "(tools/deps.sh installs it)")
        if not os.access(FC, os.X_OK):
            raise Fail(f"{FC} is not built (run make)")
        # the tree the binary was built from, and a private copy of it: every run uses the
        # same binary, even if someone rebuilds ./fireclaw meanwhile
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        self.git = (head, dirty)
        copy = os.path.join(self.tmp, "fireclaw")
        for attempt in range(10):  # a build may be relinking it right now
            shutil.copy2(FC, copy)
            if run([copy, "--version"])[0] == 0:
                break
            time.sleep(2)
        else:
            raise Fail(f"{FC} does not run (a build in progress? run make)")
        FC = copy
        self.rusage_so = os.path.join(self.tmp, "rusage.so")
        st, _, err = run(["cc", "-shared", "-fPIC", "-O2", "-o", self.rusage_so,
                          os.path.join(ROOT, "bench", "rusage.c")])
        if st != 0:
            raise Fail("cannot compile bench/rusage.c: " + err.strip().splitlines()[-1])

        st, out, err = run([FC, "-e", 'local d = require("fireclaw.vm").detect{} '
                                      'io.write(require("fireclaw.json").encode(d))'])
        if st != 0:
            raise Fail("fireclaw cannot detect its VMM: " + err.strip())
        self.detect = json.loads(out)
        if self.detect.get("vmm") != "qemu":
            raise Fail(f"fireclaw chose {self.detect.get('vmm')}; the baseline is QEMU "
                       "(run with FIRECLAW_VMM=qemu)")
        self.fc_env["FIRECLAW_VMM"] = "qemu"

        # the image and the snapshot: made when missing
        self.imgdir = os.path.join(STATE, "images", IMAGE)
        if not os.path.exists(os.path.join(self.imgdir, "manifest.json")):
            self.log("no image: fireclaw image build")
            st, _, err = run([FC, "image", "build"], self.fc_env, timeout=900)
            if st != 0:
                raise Fail("fireclaw image build failed: " + (err.strip().splitlines() or ["?"])[-1])
        self.snapdir = os.path.join(STATE, "snapshots", IMAGE)
        if not os.path.exists(os.path.join(self.snapdir, "meta.json")):
            self.log("no snapshot: fireclaw snapshot create")
            self.snapshot_create()
        self.log("warm-up: one restored run")
        r = self.fc_run("restore")
        if not r["ok"] and r.get("boot") == "cold":
            # the snapshot exists but fireclaw refuses it (image rebuilt, QEMU upgraded)
            self.log("fireclaw does not restore from the snapshot: fireclaw snapshot create")
            self.snapshot_create()
            r = self.fc_run("restore")
        if not r["ok"]:
            raise Fail("fireclaw run from the snapshot fails: " + " / ".join(r["err"]))
        self.private_state()
        self.log("warm-up: one restored run in the bench's own state directory")
        r = self.fc_run("restore")
        if not r["ok"]:
            raise Fail("fireclaw run from the snapshot fails: " + " / ".join(r["err"]))
        with open(os.path.join(self.imgdir, "manifest.json")) as f:
            self.manifest = json.load(f)
        with open(os.path.join(self.snapdir, "meta.json")) as f:
            self.meta = json.load(f)

        st, _, _ = run([QEMU, "-sandbox", "on", "-version"])
        self.sandbox = st == 0
        self.baseline_env()
        if os.environ.get("BENCH_BASELINE_SNAPSHOT") == "own":
            self.bl_snapdir = os.path.join(self.tmp, "snapshot")
            self.log("baseline: its own snapshot, by hand")
            env = dict(os.environ, **self.bl_env["cold"])
            st, _, err = run([BASELINE, "snapshot", self.next_id(), self.imgdir, self.bl_snapdir], env)
            if st != 0:
                raise Fail("baseline snapshot failed: " + err.strip())
            self.bl_env["restore"] = dict(self.bl_env["cold"])
            self.snapshot_source = "its own, made by hand with the same recipe (cold boot, QMP stop, " \
                "x-ignore-shared, migrate exec:cat > vmstate, copy of memory and disk)"
        else:
            self.bl_snapdir = self.snapdir
            self.snapshot_source = "fireclaw's own snapshot (`fireclaw snapshot create`: vmstate, memory, " \
                "disk.ext4), the very same files for both"
        self.check_argv()
        self.log("warm-up: one baseline restore")
        r = self.bl_run("restore")
        if not r["ok"]:
            raise Fail("the hand-made baseline fails: " + " / ".join(r["err"]))

    def private_state(self):
        """The image, the keys and the snapshot, hard-linked (else copied) into a state
        directory of the bench's own (FIRECLAW_STATE): all runs use the same files even if
        someone rebuilds the image or re-creates the snapshot in the shared one meanwhile."""
        priv = os.path.join(self.tmp, "state")
        shared_img = os.path.join(STATE, "images", IMAGE)
        for attempt in range(3):
            shutil.rmtree(priv, ignore_errors=True)
            os.makedirs(os.path.join(priv, "images"))
            os.makedirs(os.path.join(priv, "snapshots"))
            real = os.path.realpath(shared_img)
            dst = os.path.join(priv, "images", os.path.basename(real))
            pairs = [(real, dst), (os.path.join(STATE, "keys"), os.path.join(priv, "keys")),
                     (self.snapdir, os.path.join(priv, "snapshots", IMAGE))]
            ok = True
            for a, b in pairs:
                if run(["cp", "-al", a, b])[0] != 0 and \
                        run(["cp", "-a", "--reflink=auto", "--sparse=always", a, b])[0] != 0:
                    ok = False
                    break
            if ok:
                if dst != os.path.join(priv, "images", IMAGE):
                    os.symlink(os.path.basename(real), os.path.join(priv, "images", IMAGE))
                break
            time.sleep(1)  # the shared image or snapshot was being replaced: again
        else:
            raise Fail(f"cannot copy the image and snapshot from {STATE} into {priv}")
        self.fc_env["FIRECLAW_STATE"] = priv
        self.state = priv
        self.imgdir = dst
        self.snapdir = os.path.join(priv, "snapshots", IMAGE)

    def snapshot_create(self):
        st, _, err = run([FC, "snapshot", "create"], self.fc_env, timeout=600)
        if st != 0:
            raise Fail("fireclaw snapshot create failed: " + (err.strip().splitlines() or ["?"])[-1])

    def host_tsc_khz(self):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read())
        return int(float(m.group(1)) * 1000 + 0.5) if m else None

    def baseline_env(self):
        """What baseline.sh needs, read from the image and the snapshot as fireclaw reads them."""
        man, meta = self.manifest, self.meta
        accel = self.detect.get("accel", "tcg")
        kernel = os.path.join(self.imgdir, "vmlinux")
        if not os.path.exists(kernel):
            kernel = os.path.join(self.imgdir, "vmlinuz")
        initrd = os.path.join(self.imgdir, "initrd")
        args = list(man.get("boot_args") or [])
        if accel == "tcg":
            khz = self.host_tsc_khz()
            for a in man.get("boot_args_tcg") or []:
                if a.startswith("tsc_early_khz="):
                    if khz:
                        args.append(f"tsc_early_khz={khz}")
                else:
                    args.append(a)
        known = os.path.join(self.tmp, "known_hosts")
        with open(os.path.join(self.imgdir, "host_key.pub")) as f:
            host_key = " ".join(f.read().split()[:2])
        with open(known, "w") as f:
            f.write(f"172.16.0.2 {host_key}\n")
        common = {
            "FCB_TMP": self.tmp, "FCB_QEMU": QEMU, "FCB_QEMU_DATA": qemu_data_dir(QEMU) or "",
            "FCB_ACCEL": accel,
            "FCB_SANDBOX": "1" if self.sandbox else "0",
            "FCB_KEY": os.path.join(self.state, "keys", "id_ed25519"), "FCB_KNOWN_HOSTS": known,
            # the guest agent's virtio-serial ports: the snapshot's machine has them
            "FCB_AGENT_PORTS": str((meta.get("vmm_info") or {}).get("agent_ports") or 0),
        }
        self.bl_env = {
            "cold": dict(common, FCB_KERNEL=kernel, FCB_INITRD=initrd if os.path.exists(initrd) else "",
                         FCB_APPEND=" ".join(args), FCB_MEM="256", FCB_VCPU="1"),
        }
        # a restore repeats the snapshot's machine: same kernel, initrd and boot args (the
        # image's, which fireclaw checked against the snapshot), the snapshot's size
        self.bl_env["restore"] = dict(self.bl_env["cold"], FCB_MEM=str(meta.get("mem_mib", 256)),
                                      FCB_VCPU=str(meta.get("vcpu", 1)))

    def check_argv(self):
        """Compare the baseline's QEMU command line with the one fireclaw really runs (read
        from its VMM's /proc/PID/cmdline during a run of `sleep 2`). How files reach QEMU is
        left aside (a path, or a descriptor fireclaw opened: /proc/self/fd/N, -add-fd sets,
        chardevs): each file-valued option is compared by its role, and the kernel, initrd and
        RAM file by identity (the file behind the path or the descriptor)."""
        self.argv_check = {}
        for mode in ("restore", "cold"):
            self.log(f"checking the baseline's QEMU command line against fireclaw's ({mode})")
            argv = [FC, "run", "--json"] + (["--no-snapshot"] if mode == "cold" else []) + ["--", "sleep", "2"]
            p = start(argv, self.fc_env)
            fc_argv, fc_fds = None, {}
            deadline = time.monotonic() + 120
            while fc_argv is None and p.poll() is None and time.monotonic() < deadline:
                for vid in os.listdir(os.path.join(RUN_DIR, "vms")):
                    try:
                        with open(os.path.join(RUN_DIR, "vms", vid, "record.json")) as f:
                            rec = json.load(f)
                        if rec.get("owner", {}).get("pid") != p.pid or not rec.get("vmm", {}).get("pid"):
                            continue
                        qpid = rec["vmm"]["pid"]
                        with open(f"/proc/{qpid}/cmdline", "rb") as f:
                            words = f.read().decode().split("\0")[:-1]
                        # the record names the VMM from its fork on: until its exec, the
                        # child is still a copy of fireclaw
                        if words and os.path.basename(words[0]).startswith("qemu-system"):
                            fc_argv = words
                            for fd in os.listdir(f"/proc/{qpid}/fd"):
                                try:
                                    fc_fds[fd] = os.readlink(f"/proc/{qpid}/fd/{fd}")
                                except OSError:
                                    pass
                    except (OSError, ValueError, AttributeError, KeyError):
                        pass
                time.sleep(0.01)
            st, _, err = finish(p)
            if st != 0 or fc_argv is None:
                raise Fail(f"cannot read the QEMU command line of a fireclaw {mode} run "
                           f"(status {st}: {err.strip()[-200:]})")
            env = dict(os.environ, **self.bl_env[mode], FCB_DRY="1")
            src = self.bl_snapdir if mode == "restore" else self.imgdir
            st, out, err = run([BASELINE, mode, "ID", src], env)
            bl_argv = out.splitlines()
            a, a_files = canon_argv(fc_argv, fc_fds)
            b, b_files = canon_argv(bl_argv, {})
            # the one deliberate difference: the baseline's migration streams run `cat` (exec:),
            # which seccomp's spawn group would forbid
            a = [x.replace(",spawn=deny", "") if x.startswith("-sandbox ") else x for x in a]
            # and a cold boot's -S: fireclaw starts QEMU paused while it copies the rest of
            # the disk, then sends `cont` (the baseline copies the whole disk first)
            if mode == "cold":
                a = [x for x in a if x != "-S"]
            # and the root disk, when fireclaw's is an overlay (a run that is not kept)
            accepted = accept_disk(a, b)
            diff = [f"fireclaw only: `{x}`" for x in sorted(set(a) - set(b))] + \
                [f"baseline only: `{x}`" for x in sorted(set(b) - set(a))]
            for role in ("kernel", "initrd") + (("ram file",) if mode == "restore" else ()):
                fa, fb = a_files.get(role), b_files.get(role)
                if fa and fb and os.path.realpath(fa) != os.path.realpath(fb):
                    diff.append(f"{role}: fireclaw `{fa}`, baseline `{fb}`")
                elif not fa:
                    diff.append(f"{role}: could not tell which file fireclaw's QEMU got")
            self.argv_check[mode] = (diff, fc_argv, accepted)
            if diff:
                self.log(f"  differences: {diff}")

    # ------------------------------------------------------------ measurements

    def interleaved(self, mode, n):
        fc, bl = [], []
        for i in range(n):
            order = ("fc", "bl") if i % 2 == 0 else ("bl", "fc")
            for who in order:
                if who == "fc":
                    fc.append(self.fc_run(mode))
                else:
                    bl.append(self.bl_run(mode))
            if (i + 1) % 5 == 0 or i + 1 == n:
                self.log(f"  {mode}: {i + 1}/{n} pairs, medians so far fireclaw "
                         f"{med([r['wall'] for r in fc if r['ok']]):.0f} ms, baseline "
                         f"{med([r['wall'] for r in bl if r['ok']]):.0f} ms")
        return fc, bl

    def exec_live(self):
        st, out, err = run([FC, os.path.join(ROOT, "bench", "exec_live.lua"), "100"], env=self.fc_env)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.notes.append("bench/exec_live.lua failed: " + " / ".join(err.strip().splitlines()[-3:]))
            return {}

    def concurrency(self):
        res = {}
        for k in LEVELS:
            rounds = []
            for _ in range(N_ROUNDS):
                hs = [self.fc_start("restore") for _ in range(k)]
                t0 = hs[0]["t0"]
                rs = []
                # wait for them in threads so each one's end is taken when it ends
                done = [None] * k

                def wait(i):
                    done[i] = self.fc_finish(hs[i])
                ths = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(k)]
                for t in ths:
                    t.start()
                for t in ths:
                    while t.is_alive():
                        t.join(0.2)
                end = max(h["t0"] + r["wall"] / 1000 for h, r in zip(hs, done))
                rs = done
                rounds.append({"total": (end - t0) * 1000, "runs": rs})
            ok = [r for rd in rounds for r in rd["runs"] if r["ok"]]
            fails = [r for rd in rounds for r in rd["runs"] if not r["ok"]]
            res[k] = {"rounds": rounds, "ok": ok, "fails": fails}
            self.log(f"  {k} at once: {N_ROUNDS} rounds, total median {med([rd['total'] for rd in rounds]):.0f} ms, "
                     f"{len(fails)} failures")
        return res

    def stage_cpu(self, mode, n):
        """fireclaw's own CPU per stage: bench/stagecpu.lua runs the built-in run recipe with
        getrusage(RUSAGE_SELF) taken at each stage."""
        out = os.path.join(self.tmp, f"stagecpu-{mode}.jsonl")
        res = []
        for _ in range(n):
            argv = [FC, os.path.join(ROOT, "bench", "stagecpu.lua"), "--json"] + \
                (["--no-snapshot"] if mode == "cold" else []) + ["--", "true"]
            st, so, err = run(argv, dict(self.fc_env, FCB_STAGECPU_OUT=out))
            try:
                ok = st == 0 and json.loads(so).get("boot") == ("cold" if mode == "cold" else "snapshot")
            except ValueError:
                ok = False
            if not ok:
                self.notes.append(f"a stage-CPU run ({mode}) failed: " + " / ".join(err.strip().splitlines()[-2:]))
        try:
            with open(out) as f:
                res = [json.loads(line) for line in f]
        except OSError:
            pass
        return res

    def network(self):
        """Restored runs per network mode, interleaved. The VMs' veths go to a namespace of
        our own (FIRECLAW_UPLINK_NETNS) and dnsmasq is pointed at an address there: nothing
        reaches the host's network (`true` sends nothing anyway)."""
        up = f"fcb-{self.tag}-up"
        if run(["ip", "netns", "add", up])[0] != 0:
            raise Fail(f"cannot create the namespace {up}")
        saved = dict(self.fc_env)
        self.fc_env.update(FIRECLAW_UPLINK_NETNS=up, FIRECLAW_DNS="198.18.0.1")
        res = {label: [] for label, _ in NET_MODES}
        port = 20000 + os.getpid() % 20000
        try:
            for _ in range(N_NET):
                for label, opts in NET_MODES:
                    res[label].append(self.fc_run("restore", [o.replace("PORT", str(port)) for o in opts]))
        finally:
            self.fc_env = saved
            run(["ip", "netns", "del", up])
        return res

    def memory_copy(self):
        """The restore's memory copy alone: bench/memcopy.lua fills a memfd from the snapshot's
        memory N times (vm.memfd, as the QEMU driver does) and reports its CPU."""
        ram = int(self.meta.get("mem_mib", 256)) * 1024 * 1024
        st, out, err = run([FC, os.path.join(ROOT, "bench", "memcopy.lua"), os.path.join(self.snapdir, "memory"),
                            str(ram), str(N_MEMCOPY)], self.fc_env)
        try:
            return json.loads(out) if st == 0 else None
        except ValueError:
            return None
        finally:
            if st != 0:
                self.notes.append("the memory copy benchmark failed: " + " / ".join(err.strip().splitlines()[-2:]))

    def qemu_next(self):
        """With a QEMU >= 8.2 (tools/qemu-next.sh's, when it is there) a throw-away restore maps
        the snapshot's memory instead of copying it: restored runs mapped and copied (the
        mapping switched off), interleaved, from a snapshot made with that QEMU in a state of
        its own. {"why": …} when there is no such QEMU or no snapshot could be made."""
        st, out, err = run([os.path.join(ROOT, "tools", "qemu-next.sh"), "--check"])
        if st != 0:
            return {"why": (err.strip().splitlines() or ["?"])[-1]}
        qemu = out.strip()
        state = os.path.join(self.tmp, "state-next")
        os.makedirs(os.path.join(state, "images"))
        for a, b in ((self.imgdir, os.path.join(state, "images", IMAGE)),
                     (os.path.join(self.state, "keys"), os.path.join(state, "keys"))):
            if run(["cp", "-al", a, b])[0] != 0 and run(["cp", "-a", "--sparse=always", a, b])[0] != 0:
                return {"why": f"cannot copy the image into {state}"}
        saved = dict(self.fc_env)
        self.fc_env.update(FIRECLAW_STATE=state, FIRECLAW_QEMU=qemu)
        try:
            st, _, err = run([FC, "snapshot", "create"], self.fc_env, timeout=600)
            if st != 0:
                return {"why": f"snapshot create with {qemu} failed: " + (err.strip().splitlines() or ["?"])[-1]}
            ver = run([qemu, "-version"])[1].strip().splitlines()
            res = {"map": [], "copy": [], "version": ver[0] if ver else qemu}
            self.fc_run("restore")  # a warm-up
            for i in range(N_NEXT):
                for arm in (("map", "copy") if i % 2 else ("copy", "map")):
                    r = self.fc_run("restore", pre=NO_MAP if arm == "copy" else ())
                    if r["mapped"] != (arm == "map"):
                        r["ok"] = False
                        r["err"] = [f"a {arm} run that {'did not map' if arm == 'map' else 'mapped'}"] + r["err"]
                    res[arm].append(r)
            # fireclaw's own CPU stage by stage on this QEMU (section 2's table, third column)
            res["stages"] = self.stage_cpu("restore-next", N_STAGECPU)
            return res
        finally:
            self.fc_env = saved

    def sequential(self):
        t0 = time.perf_counter()
        rs = [self.fc_run("restore") for _ in range(N_SEQ)]
        total = (time.perf_counter() - t0) * 1000
        return {"total": total, "runs": rs}

    def startup(self):
        """fireclaw -e '' against, for scale, luajit -e '' and an empty C program linked with
        the libraries fireclaw links (PKG_LIBS; those it loads on first use are not among
        them; a -lcurl there would get a second program without it)."""
        out = os.path.join(self.tmp, "hyperfine.json")
        cmds = [f"{FC} -e ''", "luajit -e ''", f"{QEMU} -sandbox on -version"]
        self.libs_note = None
        try:
            with open(os.path.join(ROOT, "build", "pkg.mk")) as f:
                libs = re.search(r"PKG_LIBS := (.*)", f.read()).group(1).split()
            src = os.path.join(self.tmp, "empty.c")
            with open(src, "w") as f:
                f.write("int main(void) { return 0; }\n")
            made = []
            variants = [("empty-all-libs", libs)]
            if "-lcurl" in libs:
                variants.append(("empty-no-curl", [x for x in libs if x != "-lcurl"]))
            for name, ls in variants:
                exe = os.path.join(self.tmp, name)
                if run(["cc", "-O2", "-o", exe, src, "-Wl,--no-as-needed"] + ls + ["-lm"])[0] == 0:
                    made.append(exe)
            if len(made) == len(variants):
                cmds += made
                self.libs_note = (" ".join(libs), self.count_libs(made[0]),
                                  self.count_libs(made[1]) if len(made) > 1 else None)
        except (OSError, AttributeError):
            pass
        st, _, err = run(["hyperfine", "-N", "--warmup", "20", "--runs", str(N_STARTUP), "--export-json", out]
                         + cmds, self.fc_env, timeout=600)
        if st != 0:
            raise Fail("hyperfine failed: " + err.strip()[-200:])
        with open(out) as f:
            return json.load(f)["results"]

    def count_libs(self, exe):
        st, out, _ = run(["ldd", exe])
        return sum(1 for line in out.splitlines() if "=>" in line or line.strip().startswith("/"))

    # ------------------------------------------------------------ the whole run

    def main(self):
        self.load_start = os.getloadavg()
        self.date = datetime.datetime.now(datetime.timezone.utc)
        self.setup()
        self.log(f"1. restored runs: {N_RESTORE} pairs, fireclaw and baseline interleaved")
        self.restore = self.interleaved("restore", N_RESTORE)
        self.log(f"1. cold runs: {N_COLD} pairs, interleaved")
        self.cold = self.interleaved("cold", N_COLD)
        self.log(f"1. the SSH path: {N_RESTORE} restored and {N_COLD} cold runs with --exec ssh")
        self.ssh_runs = {"restore": [self.fc_run("restore-ssh") for _ in range(N_RESTORE)],
                         "cold": [self.fc_run("cold-ssh") for _ in range(N_COLD)]}
        self.log("1. execs on a live VM: 100 through the agent, 100 over SSH (bench/exec_live.lua)")
        self.live = self.exec_live()
        self.log(f"2. fireclaw's CPU per stage: {N_STAGECPU} restored and {N_STAGECPU} cold runs")
        self.cpu_stages = {"restore": self.stage_cpu("restore", N_STAGECPU), "cold": self.stage_cpu("cold", N_STAGECPU)}
        self.log(f"2. the restore's memory copy: {N_MEMCOPY} copies")
        self.memcopy = self.memory_copy()
        self.log(f"2. QEMU >= 8.2: {N_NEXT} pairs of restored runs, the memory mapped and copied")
        self.next = self.qemu_next()
        self.log(f"2. start-up: hyperfine, {N_STARTUP} runs each")
        self.start = self.startup()
        self.log(f"4. concurrency: {LEVELS} at once, {N_ROUNDS} rounds each")
        self.conc = self.concurrency()
        self.log(f"5. throughput: {N_SEQ} restored runs back to back")
        self.seq = self.sequential()
        self.log(f"6. network modes: {N_NET} restored runs each, interleaved")
        self.net = self.network()
        self.load_end = os.getloadavg()
        self.elapsed = time.monotonic() - self.t_start
        with open(os.path.join(self.snapdir, "meta.json")) as f:
            if json.load(f).get("created") != self.meta.get("created"):
                self.notes.append("**The snapshot was re-created by someone else during the run**: "
                                  "the restore figures may mix two snapshots.")
        self.write_report()
        self.log(f"done in {self.elapsed:.0f} s: {OUT}")

    # ------------------------------------------------------------ report

    def versions(self):
        def first(argv):
            try:
                return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0].strip()
            except (OSError, IndexError):
                return "?"
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
        with open("/proc/meminfo") as f:
            mem = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1)) // 1024
        head, dirty = self.git
        ki = self.manifest.get("kernel_info", {})
        ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
        m = re.search(r"socat version (\S+)", subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout)
        socat_v = m.group(1) if m else "?"
        return {
            "cpu": f"{cpu}, {os.cpu_count()} CPUs, {mem} MiB RAM",
            "host": f"Linux {os.uname().release} ({os.uname().machine})",
            "vmm": f"QEMU {self.detect.get('qemu_version')} `-M microvm`, accel **{self.detect.get('accel')}** "
                   f"(/dev/kvm: {self.detect.get('kvm')}; {self.detect.get('kvm_why') or self.detect.get('why')})",
            "qemu": first([QEMU, "-version"]) + ("" if QEMU == shutil.which("qemu-system-x86_64") else f" ({QEMU})"),
            "guest": f"{ki.get('package', '?')} {ki.get('version', '')} (image built {self.manifest.get('created')})",
            "fireclaw": first([FC, "--version"]) + f", git {head}" + (" + uncommitted changes in the tree" if dirty else ""),
            "tools": f"hyperfine {first(['hyperfine', '--version']).split()[-1]}, {ssh_v.split(',')[0]}, "
                     f"socat {socat_v}",
        }

    def stage_table(self, fc_runs, bl_runs, mode):
        """Rows: stage | fireclaw median (min–max) | baseline median (min–max) | difference
        of the medians."""
        fc_ok = [r for r in fc_runs if r["ok"]]
        bl_ok = [r for r in bl_runs if r["ok"] and "stages" in r]

        def fc_stage(pred):
            return lambda r: sum(ms for name, ms in r["stages"] if pred(name))

        def bl(*names):
            def fn(r):
                d = dict(r["stages"])
                xs = [d.get(n) for n in names]
                return None if None in xs else sum(xs)
            return fn

        def spawn(r):
            return r["qmp_ready"]

        def rest(r):
            vmm = sum(ms for name, ms in r["stages"] if name.startswith("VMM"))
            return vmm - r["qmp_ready"] if r["qmp_ready"] is not None else None

        # the guest's channel: the agent (hello; after a restore, its hand-off) or SSH (reseed exec)
        ssh_ready = fc_stage(lambda n: n in ("SSH ready", "agent ready"))
        command = fc_stage(lambda n: n == "command" or n.startswith("hand-off") or n.startswith("reseed"))
        rows = [("fireclaw record (state)", fc_stage(lambda n: n == "record"), None),
                ("namespace + tap", fc_stage(lambda n: n == "network"), bl("network")),
                # (a sparse copy takes the disk's head here; its rest while QEMU starts: in the spawn row)
                # (fireclaw's throw-away run: a qcow2 overlay, nothing copied)
                ("disk copy (fireclaw: or its overlay)",
                 fc_stage(lambda n: n.startswith("disk copy") or n.startswith("disk head")
                          or n.startswith("disk overlay")),
                 bl("disk"))]
        if mode == "restore":
            rows += [("VMM spawn (until QMP answers)", spawn, bl("spawn")),
                     ("restore (migrate-incoming … cont)", rest, bl("restore")),
                     ("guest channel ready (fireclaw: the agent's hello, or libssh2 connect, handshake, auth; "
                      "baseline: TCP probe)", ssh_ready,
                      bl("probe")),
                     ("exec `date -s …; true` (fireclaw: hand-off or reseed, then the command; baseline: a whole "
                      "`ssh` process: handshake, auth, exec)", command,
                      bl("ssh")),
                     ("*the guest-facing part: the two rows above together*",
                      lambda r: ssh_ready(r) + command(r), bl("probe", "ssh"))]
        else:
            rows += [("VMM spawn (fireclaw: until QMP answers; baseline: fork)", spawn, bl("spawn")),
                     ("boot until the guest answers (fireclaw: its agent, or sshd + libssh2 connect, handshake, "
                      "auth)", ssh_ready, bl("probe")),
                     ("exec `true` (baseline: a whole `ssh` process: handshake, auth, exec)", command, bl("ssh")),
                     ("*from spawning the VMM to the command's end: the three rows above together*",
                      lambda r: (spawn(r) or 0) + ssh_ready(r) + command(r), bl("spawn", "probe", "ssh"))]
        rows += [("teardown", fc_stage(lambda n: n == "teardown"), bl("teardown")),
                 ("outside the stages (fireclaw: process start, Lua modules, image and snapshot checks, "
                  "VMM detection, JSON, exit; baseline: bash start and exit)",
                  lambda r: r["wall"] - sum(ms for _, ms in r["stages"]), lambda r: r["wall"] - r["inside"]),
                 ("**total (wall)**", lambda r: r["wall"], lambda r: r["wall"])]

        def values(runs, fn):
            return [x for x in (fn(r) for r in runs) if x is not None] if fn else []

        lines = [f"| stage ({'restore' if mode == 'restore' else 'boot'}) | fireclaw, ms | baseline, ms | "
                 "fireclaw − baseline (medians), ms |", "|---|---:|---:|---:|"]
        for label, f, b in rows:
            fx, bx = values(fc_ok, f), values(bl_ok, b)
            delta = f"{med(fx) - med(bx):+.1f}" if fx and bx else "–"
            lines.append(f"| {label} | {summary(fx, 1, '')} | {summary(bx, 1, '')} | {delta} |")
        return "\n".join(lines)

    def next_table(self):
        """Section 2's QEMU >= 8.2 paragraph: the memory mapped against copied."""
        nx = self.next
        if "why" in nx:
            return f"Restores on QEMU >= 8.2 (the snapshot's memory mapped, not copied): not measured: {nx['why']}."
        L = [f"Restores on QEMU >= 8.2 ({nx['version']}, tools/qemu-next.sh; a snapshot made with it): a throw-away "
             "restore maps the snapshot's `memory` privately and read-only instead of copying it (the DECISIONS.md "
             f"entry on golden memory mapped on QEMU >= 8.2). {N_NEXT} interleaved pairs of `fireclaw run -- true`, "
             "the copy forced by switching the mapping off:", "",
             "| | runs | fireclaw CPU user+sys, ms | peak RSS (VmHWM), MiB | VMM restore stage, ms | whole run, ms | failures |",
             "|---|---:|---:|---:|---:|---:|---:|"]
        for arm, name in (("map", "mapped"), ("copy", "copied")):
            rs = nx[arm]
            ok = [r for r in rs if r["ok"] and "cpu_user" in r]
            stage = [ms for r in ok for n, ms in r["stages"] if n.startswith("VMM restore")]
            L.append(f"| {name} | {len(ok)} | {summary([r['cpu_user'] + r['cpu_sys'] for r in ok], 1, '')} | "
                     f"{summary([r['hwm'] / 1024 for r in ok], 1, '')} | {summary(stage, 1, '')} | "
                     f"{summary([r['wall'] for r in ok], 0, '')} | {len(rs) - len([r for r in rs if r['ok']])} |")
        return "\n".join(L)

    def cpu_stage_table(self):
        runs = dict(self.cpu_stages)
        runs["next"] = (self.next or {}).get("stages") or []
        names = []
        for mode in ("restore", "cold", "next"):
            for r in runs[mode]:
                for st in r["stages"]:
                    key = "VMM restore / boot" if st["name"].startswith("VMM") else st["name"]
                    if key not in names:
                        names.append(key)

        def col(mode, fn):
            xs = [x for x in (fn(r) for r in runs[mode]) if x is not None]
            return summary(xs, 1, "")

        def stage(key, field):
            def fn(r):
                xs = [st[field] for st in r["stages"]
                      if st["name"] == key or (key == "VMM restore / boot" and st["name"].startswith("VMM"))]
                return sum(xs) if xs else None
            return fn

        def nothing(r):
            return None

        rows = [("process start-up (exec, dynamic libraries, Lua state; until the recipe starts)",
                 lambda r: r["start"], nothing),
                ("before the first stage (Lua modules and recipes, stale VMs, image and snapshot checks, "
                 "VMM detection: QEMU's version and seccomp support, probed or cached)", lambda r: r["before"],
                 lambda r: r.get("before_ms"))]
        rows += [(f"stage: {k}", stage(k, "cpu_ms"), stage(k, "ms")) for k in names]
        rows += [("after the last stage (JSON, exit)", lambda r: r["after"], lambda r: r.get("after_ms")),
                 ("**total**", lambda r: r["start"] + r["before"] + r["after"] + sum(st["cpu_ms"] for st in r["stages"]),
                  nothing)]
        L = [f"fireclaw's own CPU time stage by stage: bench/stagecpu.lua runs the built-in `run` recipe with "
             f"`getrusage(RUSAGE_SELF)` taken at each of its stages ({len(runs['restore'])} restored and "
             f"{len(runs['cold'])} cold runs of `-- true`, apart from the runs above; wall time alongside; and "
             f"{len(runs['next'])} restored runs on QEMU >= 8.2, whose restores map the snapshot's memory: see "
             "below):", "",
             "| part of the run | restored: CPU ms | wall ms | cold: CPU ms | wall ms | restored, QEMU >= 8.2: CPU ms "
             "| wall ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        L += [f"| {name} | {col('restore', c)} | {col('restore', w)} | {col('cold', c)} | {col('cold', w)} | "
              f"{col('next', c)} | {col('next', w)} |" for name, c, w in rows]
        return "\n".join(L)

    def write_report(self):
        v = self.versions()
        fc_r, bl_r = self.restore
        fc_c, bl_c = self.cold

        def walls(rs):
            return [r["wall"] for r in rs if r["ok"]]

        def nfail(rs):
            return sum(1 for r in rs if not r["ok"])

        def ratio(a, b):
            return med(walls(a)) / med(walls(b)) if walls(a) and walls(b) else float("nan")

        def paired(a, b):
            xs = [x["wall"] / y["wall"] for x, y in zip(a, b) if x["ok"] and y["ok"]]
            return med(xs)

        r_ratio, c_ratio = ratio(fc_r, bl_r), ratio(fc_c, bl_c)
        cpu = {m: [r["cpu_user"] + r["cpu_sys"] for r in rs if r["ok"] and "cpu_user" in r]
               for m, rs in (("restore", fc_r), ("cold", fc_c))}
        hwm = [r["hwm"] / 1024 for r in fc_r + fc_c if r["ok"] and "hwm" in r]
        next_cpu = [r["cpu_user"] + r["cpu_sys"] for r in (self.next or {}).get("map", [])
                    if r["ok"] and "cpu_user" in r]
        fcs = next(x for x in self.start if "fireclaw" in x["command"])
        st_med = fcs["median"] * 1000
        teardown = {m: [ms for r in rs if r["ok"] for name, ms in r["stages"] if name == "teardown"]
                    for m, rs in (("restore", fc_r), ("cold", fc_c))}
        conc_fails = sum(len(x["fails"]) for x in self.conc.values())
        conc_total = sum(len(x["fails"]) + len(x["ok"]) for x in self.conc.values())

        def yes(ok):
            return "**met**" if ok else "**missed**"

        targets = [
            ("restored run ≤ 0.8× the hand-made baseline", f"{r_ratio:.2f}× (medians)", r_ratio <= TARGETS["restore_ratio"]),
            ("cold run ≤ 1.0× the hand-made baseline", f"{c_ratio:.2f}× (medians)", c_ratio <= TARGETS["cold_ratio"]),
            ("fireclaw's own CPU ≤ 10 ms per run", f"{med(cpu['restore']):.1f} ms restored, {med(cpu['cold']):.1f} ms cold (medians)",
             max(med(cpu["restore"]), med(cpu["cold"])) <= TARGETS["cpu_ms"]),
            ("start-up (`fireclaw -e ''`) ≤ 5 ms", f"{st_med:.1f} ms (median)", st_med <= TARGETS["startup_ms"]),
            ("teardown ≤ 20 ms", f"{med(teardown['restore']):.1f} ms restored, {med(teardown['cold']):.1f} ms cold "
             "(medians)", max(med(teardown["restore"]), med(teardown["cold"])) <= TARGETS["teardown_ms"]),
            ("no failures under concurrency", f"{conc_fails} of {conc_total} runs failed", conc_fails == 0),
            ("restored run through the agent ≤ 0.35× the hand-made baseline (issue 14)", f"{r_ratio:.2f}× (medians)",
             r_ratio <= 0.35),
            ("cold run ≤ 0.7× the hand-made baseline (issue 14)", f"{c_ratio:.2f}× (medians)", c_ratio <= 0.7),
            ("fireclaw's own CPU per restored run ≤ 10 ms on QEMU >= 8.2 (issue 14; its restores map the "
             "snapshot's memory, section 2)", f"{med(next_cpu):.1f} ms (median of {len(next_cpu)})" if next_cpu
             else "not measured (no QEMU >= 8.2)", bool(next_cpu) and med(next_cpu) <= TARGETS["cpu_ms"]),
            ("a second exec on a live VM (agent) ≤ 15 ms", f"{med(self.live.get('agent') or [float('nan')]):.1f} ms "
             "(median of 100)", med(self.live.get("agent") or [1e9]) <= 15),
        ]

        L = []
        w = L.append
        w("# fireclaw benchmarks")
        w("")
        w(f"Generated by `make bench` (bench/run.sh → bench/bench.py) on {self.date.strftime('%Y-%m-%d %H:%M UTC')}, "
          f"in {self.elapsed / 60:.1f} min. Every figure is *median (min–max)* over the runs named; "
          "all runs on this machine, in one go. Do not edit: run `make bench` again.")
        w("")
        w("| | |")
        w("|---|---|")
        w(f"| machine | {v['cpu']} |")
        w(f"| host kernel | {v['host']} |")
        w(f"| VMM and acceleration | {v['vmm']} |")
        w(f"| QEMU | {v['qemu']} |")
        w(f"| guest kernel | {v['guest']} |")
        w(f"| fireclaw | {v['fireclaw']} |")
        w(f"| tools | {v['tools']} |")
        w(f"| load average | {self.load_start[0]:.2f} at the start, {self.load_end[0]:.2f} at the end "
          "(the machine is shared: other work ran at the same time) |")
        w("")
        w("## Targets")
        w("")
        w("| target | measured | |")
        w("|---|---|---|")
        for t, m, ok in targets:
            w(f"| {t} | {m} | {yes(ok)} |")
        w("")
        w("## 1. `fireclaw run -- true` against the same run by hand")
        w("")
        w(f"Each fireclaw run is paired with a baseline run right before or after it (the order alternates), "
          f"{N_RESTORE} pairs restored and {N_COLD} pairs cold. Wall time of the whole process, start to exit.")
        w("")
        w("| | fireclaw, ms | baseline, ms | ratio of medians | median of pair ratios | failures (fireclaw / baseline) |")
        w("|---|---:|---:|---:|---:|---:|")
        w(f"| from the snapshot | {summary(walls(fc_r))} | {summary(walls(bl_r))} | {r_ratio:.2f}× | "
          f"{paired(fc_r, bl_r):.2f}× | {nfail(fc_r)} / {nfail(bl_r)} |")
        w(f"| cold (`--no-snapshot`) | {summary(walls(fc_c))} | {summary(walls(bl_c))} | {c_ratio:.2f}× | "
          f"{paired(fc_c, bl_c):.2f}× | {nfail(fc_c)} / {nfail(bl_c)} |")
        w("")
        w("The baseline (bench/baseline.sh) uses plain tools only: `ip netns add fcb-<pid>-<n>` and one `ip -batch` "
          "for the tap (tap0 172.16.0.1/30, MAC 06:00:ac:10:00:01, a permanent neighbour entry for the guest "
          "06:00:ac:10:00:02), `cp --sparse=always` of the disk, `qemu-system-x86_64` started with `ip netns exec`, "
          "QMP through one `socat` connection (restore: `migrate-set-capabilities x-ignore-shared`, "
          "`migrate-incoming exec:cat vmstate`, `query-status` polled every 2 ms until it leaves `inmigrate`, `cont`), "
          "a TCP probe loop (`socat … connect-timeout=0.05` every 10 ms) then the OpenSSH client with the pinned host "
          "key (`ssh … root@172.16.0.2 true`; restored: `date -s @NOW >/dev/null 2>&1; true`, the clock set in the "
          "same round trip; fireclaw instead makes each clone unique first — host entropy credited, CRNG reseeded, "
          "clock set — in an exec of its own, then runs the command, and gives QEMU a memfd copy of the snapshot's "
          "memory where the baseline maps the file itself: see the stage table), and teardown: `kill -KILL` of "
          "QEMU's pid, `wait`, `ip netns del`, `rm -rf`.")
        w("")
        w(f"Baseline snapshot: {self.snapshot_source}.")
        w("")
        for mode in ("restore", "cold"):
            diff, words, accepted = self.argv_check[mode]
            w(f"QEMU command line ({mode}), checked against the one fireclaw ran (its VMM's /proc/PID/cmdline "
              "during a run; how files reach QEMU — a path or a descriptor — aside, the kernel, initrd and RAM "
              "file compared by identity, `spawn=deny` in `-sandbox` aside: the baseline's migration stream "
              "needs `exec:cat`; and a cold boot's `-S` aside: fireclaw starts QEMU paused while it copies the "
              "rest of the disk, then sends `cont`, where the baseline copies the whole disk first): " + ("**the same machine and devices**." if not diff else
                                      "**differs**: " + "; ".join(diff) + "."))
            if accepted:
                w("")
                w(f"An accepted difference ({mode}): {accepted}.")
            w("")
        w("<details><summary>fireclaw's QEMU command line (restored run)</summary>")
        w("")
        w("```")
        w(" ".join(self.argv_check["restore"][1]))
        w("```")
        w("</details>")
        w("")
        ssh_r, ssh_c = self.ssh_runs["restore"], self.ssh_runs["cold"]
        w("### The guest agent and the SSH path")
        w("")
        w("The runs above go through the guest agent (docs/agent-protocol.md) when the image has it. The same "
          "runs over SSH (`--exec ssh`: libssh2 connect, handshake, auth, the reseed exec), right after, not "
          "interleaved with the baseline:")
        w("")
        w("| | agent, ms | SSH, ms | SSH ÷ agent | failures (SSH) |")
        w("|---|---:|---:|---:|---:|")
        for name, a, b in (("from the snapshot", fc_r, ssh_r), ("cold", fc_c, ssh_c)):
            w(f"| {name} | {summary(walls(a))} | {summary(walls(b))} | "
              f"{(med(walls(b)) / med(walls(a))) if walls(a) and walls(b) else float('nan'):.2f}× | {nfail(b)} |")
        lv = self.live
        if lv.get("agent") and lv.get("ssh"):
            w("")
            w("Execs of `true` on one live, restored VM (bench/exec_live.lua: 100 each, after a first one), "
              "and this process's descriptors and RSS before and after the 100:")
            w("")
            w("| | per exec, ms | descriptors | RSS, KiB |")
            w("|---|---:|---:|---:|")
            for k in ("agent", "ssh"):
                w(f"| {k} | {summary(lv[k], 2)} | {lv[k + '_fds'][0]} → {lv[k + '_fds'][1]} | "
                  f"{lv[k + '_rss_kib'][0]} → {lv[k + '_rss_kib'][1]} |")
        w("")
        w("## 2. fireclaw's own cost per run (the guest and the VMM excluded)")
        w("")
        w("CPU time and peak RSS of the fireclaw process alone, taken with `getrusage(RUSAGE_SELF)` and "
          "`VmHWM` at its exit by a preloaded helper (bench/rusage.c; the library is removed from the environment "
          "at load time so the VMM does not inherit it). RUSAGE_SELF excludes the QEMU child fireclaw reaps. "
          "The total is exact (scheduler runtime); Linux splits it into user/sys from tick samples, so the split "
          "is approximate.")
        w("")
        w("| | runs | CPU user+sys, ms | user, ms | sys, ms | peak RSS (VmHWM), MiB |")
        w("|---|---:|---:|---:|---:|---:|")
        for m, rs in (("restored", fc_r), ("cold", fc_c)):
            ok = [r for r in rs if r["ok"] and "cpu_user" in r]
            w(f"| {m} | {len(ok)} | {summary([r['cpu_user'] + r['cpu_sys'] for r in ok], 1, '')} | "
              f"{summary([r['cpu_user'] for r in ok], 1, '')} | {summary([r['cpu_sys'] for r in ok], 1, '')} | "
              f"{summary([r['hwm'] / 1024 for r in ok], 1, '')} |")
        w("")
        w(self.cpu_stage_table())
        w("")
        if self.memcopy:
            m, mib = self.memcopy, 1024 * 1024
            w(f"The restore's memory copy on its own (bench/memcopy.lua, {len(m['fill_cpu_ms'])} times, apart from "
              "the runs above): `vm.memfd` fills a memfd of the VM's RAM size with the non-zero pages of the "
              "snapshot's `memory`, as the QEMU driver does in every restore (it is most of the restore stage's "
              "CPU); freeing is the memfd's last close, in a run fireclaw's in teardown, after QEMU exited. The "
              "copy costs per page it writes: `snapshot create` zeroes the guest's free memory first and saves "
              "zero pages as holes (the golden memory entries of docs/DECISIONS.md).")
            w("")
            w("| snapshot memory: size | held on disk | non-zero | copy: CPU, ms | copy: wall, ms | freeing: CPU, ms |")
            w("|---:|---:|---:|---:|---:|---:|")
            w(f"| {m['size'] / mib:.0f} MiB | {m['allocated'] / mib:.1f} MiB | {m['nonzero'] / mib:.1f} MiB | "
              f"{summary(m['fill_cpu_ms'], 1, '')} | {summary(m['fill_ms'], 1, '')} | {summary(m['free_cpu_ms'], 1, '')} |")
            w("")
        w(self.next_table())
        w("")
        w(f"Start-up, `hyperfine -N --warmup 20 --runs {N_STARTUP}` (for scale: the interpreter alone, and an "
          "empty C program, `int main(void) { return 0; }`, linked with the libraries fireclaw links "
          "(build/pkg.mk's PKG_LIBS: not those it loads on first use, docs/DECISIONS.md)"
          + (", with and without `-lcurl`" if self.libs_note and self.libs_note[2] else "") + "):")
        w("")
        w("| command | wall, ms | user, ms (mean) | sys, ms (mean) |")
        w("|---|---:|---:|---:|")
        for x in self.start:
            c = x["command"]
            if "fireclaw" in c:
                name = "`fireclaw -e ''`"
            elif c.startswith("luajit"):
                name = "`luajit -e ''` (the interpreter alone)"
            elif "qemu-system" in c:
                name = "`qemu-system-x86_64 -sandbox on -version` (the probe fireclaw's QEMU driver runs for " \
                       "QEMU's version and seccomp support)"
            elif c.endswith("empty-all-libs"):
                name = f"empty C program + fireclaw's libraries (`{self.libs_note[0]}`: {self.libs_note[1]} shared objects)"
            else:
                name = f"the same without `-lcurl` ({self.libs_note[2]} shared objects)"
            w(f"| {name} | {summary([t * 1000 for t in x['times']], 1, '')} | {x['user'] * 1000:.1f} | "
              f"{x['system'] * 1000:.1f} |")
        w("")
        w("## 3. Where the time goes, stage by stage")
        w("")
        w("fireclaw's figures are its own timestamps: `fireclaw run -v --json -- true` prints `stages` "
          "(ms per stage) and `duration_ms`; `-v` adds the time until QEMU answers on QMP, which splits the "
          "VMM stage into spawn and restore/boot. The baseline's come from `$EPOCHREALTIME` marks in "
          "baseline.sh. Same runs as in section 1; each row is the median over the runs on its own, so rows "
          "do not add up exactly to the total.")
        w("")
        w(f"From the snapshot ({len([r for r in fc_r if r['ok']])} fireclaw runs, "
          f"{len([r for r in bl_r if r['ok']])} baseline runs):")
        w("")
        w(self.stage_table(fc_r, bl_r, "restore"))
        w("")
        w(f"Cold ({len([r for r in fc_c if r['ok']])} fireclaw runs, {len([r for r in bl_c if r['ok']])} baseline runs):")
        w("")
        w(self.stage_table(fc_c, bl_c, "cold"))
        w("")
        w("## 4. Concurrency: restored runs at once, from one snapshot")
        w("")
        w(f"N `fireclaw run -- true` started together, {N_ROUNDS} rounds per level; total = first start to last exit "
          "of a round.")
        w("")
        w("| at once | runs | failures | total wall per round, ms | per run, ms |")
        w("|---:|---:|---:|---:|---:|")
        for k in LEVELS:
            x = self.conc[k]
            w(f"| {k} | {len(x['ok']) + len(x['fails'])} | {len(x['fails'])} | "
              f"{summary([rd['total'] for rd in x['rounds']], 0, '')} | {summary([r['wall'] for r in x['ok']], 0, '')} |")
        fails = [r for x in self.conc.values() for r in x["fails"]]
        if fails:
            w("")
            w("Failures: " + "; ".join(" / ".join(r["err"]) or f"status {r['status']}" for r in fails[:5]))
        w("")
        w("## 5. Throughput: restored runs back to back")
        w("")
        s = self.seq
        ok = [r for r in s["runs"] if r["ok"]]
        w("| runs | failures | total, s | runs per minute | per run, ms |")
        w("|---:|---:|---:|---:|---:|")
        w(f"| {len(s['runs'])} | {len(s['runs']) - len(ok)} | {s['total'] / 1000:.1f} | "
          f"{60000 * len(ok) / s['total']:.1f} | {summary([r['wall'] for r in ok], 0, '')} |")
        w("")
        w("## 6. What each network mode adds to a restored run")
        w("")
        w("Restored `run -- true` runs, the modes interleaved; the uplink is a namespace of the bench's own. "
          "*policy* is the run's `network policy (…)` stage: veth, NAT and filter tables (libnftables), dnsmasq "
          "started and answering, forwarders; a restore with egress also writes `/etc/resolv.conf` in the reseed "
          "exec, and its teardown drops the uplink's table. The host is shared (other VMs boot meanwhile): the "
          "stage columns are the stable ones.")
        w("")
        w("| mode | runs | failures | total (wall), ms | policy stage, ms | reseed exec, ms | teardown, ms | "
          "total − `--net none`, ms |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for label, _ in NET_MODES:
            rs = self.net[label]
            ok = [r for r in rs if r["ok"]]
            walls = [r["wall"] for r in ok]
            pol = [sum(ms for n, ms in r["stages"] if n.startswith("network policy")) for r in ok]
            rsd = [sum(ms for n, ms in r["stages"] if n.startswith("reseed")) for r in ok]
            down = [sum(ms for n, ms in r["stages"] if n == "teardown") for r in ok]
            m = med(walls) if walls else None
            if base is None:
                base = m
            diff = f"{m - base:+.0f}" if m is not None and base is not None else "–"
            w(f"| {label} | {len(rs)} | {len(rs) - len(ok)} | {summary(walls, 0, '')} | "
              f"{summary(pol, 1, '') if any(pol) else '–'} | {summary(rsd, 0, '')} | {summary(down, 0, '')} | {diff} |")
        w("")
        w("## Method")
        w("")
        w("- Wall times are taken by the driver around each process (fork to exit), the same way for fireclaw and "
          "the baseline; fireclaw runs with `-v --json` (for its stage times) and the preloaded rusage helper "
          "(one more tiny shared library to load).")
        w("- fireclaw runs from a neutral working directory (the bench's temporary one), so it uses its embedded "
          "recipes as a user's run does.")
        w("- The image, keys and snapshot are hard-linked into a state directory of the bench's own "
          "(FIRECLAW_STATE) after they are checked (or made) in the shared one, so that nothing else running on "
          "the machine can rebuild or replace them halfway through.")
        w("- Failures are counted, not timed: a fireclaw run fails if its exit status or its command's is not 0, "
          "or if it did not boot the way asked (a restore must say `\"boot\": \"snapshot\"`).")
        w("- fireclaw's `agent ready` is the guest agent's hello on its virtio-serial port, its `hand-off` the "
          "restore's clock + entropy frame, its `command` one exec frame (docs/agent-protocol.md); with "
          "`--exec ssh` they are `SSH ready` (libssh2 connect: TCP, handshake, auth, pinned host key), the "
          "reseed exec and one exec on that session. The baseline's `probe` is the TCP probe alone and its "
          "`ssh` is a whole OpenSSH client process (handshake, auth and exec).")
        w("- Under TCG the guest is emulated: most of a run is guest time (its kernel and dropbear), which the "
          "VMM and the tools around it cannot shorten; both sides restore the same snapshot.")
        for n in self.notes:
            w(f"- {n}")
        w("")
        tmp = os.path.join(ROOT, "BENCHMARKS.tmp") if OUT == os.path.join(ROOT, "BENCHMARKS.md") else OUT + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(L))
        os.replace(tmp, OUT)


def main():
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    b = Bench()
    try:
        b.main()
        return 0
    except Fail as e:
        sys.stderr.write(f"bench: {e}\n")
        return 1
    except Interrupted as e:
        sys.stderr.write(f"bench: interrupted ({e}); cleaning up\n")
        return 130
    except Exception as e:  # one line, not a traceback (BENCH_DEBUG=1 for that)
        if os.environ.get("BENCH_DEBUG"):
            raise
        sys.stderr.write(f"bench: failed: {type(e).__name__}: {e}\n")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        b.cleanup()


if __name__ == "__main__":
    sys.exit(main())
