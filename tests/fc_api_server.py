#!/usr/bin/python3
"""fc_api_server.py - a Firecracker stand-in for fireclaw's tests.

Two uses:

  tests/fake-firecracker --api-sock PATH [--id ID] [--version]
      Plays the `firecracker` binary: serves Firecracker's HTTP API (HTTP/1.1, keep-alive)
      on the unix socket PATH, validates every request against the official OpenAPI spec of
      the version it plays, and keeps Firecracker's state rules (pre-boot-only resources,
      /snapshot/load only on a fresh process, PATCH /vm only when running, ...). Guest
      "serial output" goes to stdout, like Firecracker's. The vsock device is played as
      v1.0 does it: its unix socket bound at PUT /vsock (an existing path fails), host
      `CONNECT <port>` answered once the "guest" runs, connections reset by a snapshot,
      the socket bound again at the recorded path by a load (an existing path fails it). Nothing boots: InstanceStart
      prints a fake boot log, snapshots are small JSON files plus a sparse memory file.

      --root DIR (not a Firecracker option; tests/fake-jailer passes /proc/self/fd/N, a
      descriptor of the chroot it kept open, so the directories above it need not be open
      to the VM's user): every path the API or --api-sock names is taken inside DIR, the
      way a jailed Firecracker sees its chroot; ".." stops at DIR and a symlink inside it is
      not followed. The fake jailer does not chroot for real (python needs its stdlib):
      this is its jail.

      Environment:
        FAKE_FC_VERSION  "1.16.1" (default) or "1.0.0": the spec and behaviour to play
        FAKE_FC_LOG      append one JSON line per request ({"method", "path", "body",
                         "status", "conn": number of the connection it came on}) and per
                         event ({"event": "start" | "open" | "exit" | "vsock-bind" (path,
                         dev, ino of the socket) | "vsock-connect" (port, mode)})
        FAKE_FC_VSOCK    what listens in the "guest" behind the vsock device, as
                         "PORT=MODE,…" (default "1024=echo", the guest agent's port):
                         echo (OK, then every byte back), hello (OK and "HELLO\n" in one
                         write, then echo), late:N (the first N connections closed as if
                         nothing listened yet, then echo), garbage (answers "NOPE 1\n"),
                         long (200 bytes without a newline), nonl ("OK 5", then closes),
                         silent (never answers), serve:PROGRAM (OK, then `PROGRAM
                         --serve-fd 3` runs with the connection as its descriptor 3: e.g.
                         the real guest agent, on the host). Any other port: closed at
                         once (no listener), as Firecracker does.
        FAKE_FC_MODE     "normal"; "no-listen" (never creates the socket); "exit-early"
                         (complains on stderr and exits 1 before listening); "mute"
                         (accepts connections and requests, never answers)
        FIRECLAW_FC_SPECS directory holding firecracker-v<version>.yaml
                         (default: vendor/firecracker-api, the official specs, unchanged)

  /usr/bin/python3 tests/fc_api_server.py   (no arguments, as tests/run calls it)
      Self-test in TAP: the spec loader, the request validator (it must reject wrong
      bodies, or the fake would prove nothing) and the state rules over a real socket.

Needs Debian's python3-yaml and python3-jsonschema (run it with /usr/bin/python3).
"""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import socketserver
import sys
import tempfile
import threading

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VERSION = "1.16.1"
# Firecracker exits with this status after a failed /snapshot/load (measured with v1.0.0)
EXIT_BAD_SNAPSHOT = 152
EXIT_ARG_PARSING = 153


ROOT = None  # --root: the jail


def host(path):
    """The file a path names: inside ROOT when there is one. ".." cannot climb out of it
    (as in a chroot), and a symlink inside it is not followed (a real chroot would follow
    it inside; fireclaw never puts one there): such a path does not exist."""
    if ROOT is None:
        return path
    cur = ROOT
    for comp in os.path.normpath("/" + path).split("/"):
        if comp in ("", "."):
            continue
        cur = os.path.join(cur, comp)
        if os.path.islink(cur):
            raise FileNotFoundError(2, "No such file or directory (a symlink in the jail)", path)
    return cur


def spec_dir():
    return os.environ.get("FIRECLAW_FC_SPECS") or os.path.join(
        HERE, "..", "vendor", "firecracker-api")


# ---- the spec ----

class _SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML 1.1 reads `Off`/`On`/`yes` as booleans (the v1.16 Logger enum has `Off`);
    OpenAPI means strings. Only true/false are booleans here."""


_SpecLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|false|True|False|TRUE|FALSE)$"),
    list("tTfF"))


def load_spec(version):
    path = os.path.join(spec_dir(), "firecracker-v%s.yaml" % version)
    with open(path) as f:
        return yaml.load(f, Loader=_SpecLoader)


def strict(schema):
    """Firecracker's structs deny unknown fields (serde deny_unknown_fields): every object
    schema that lists its properties gets additionalProperties: false."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "$ref" not in out:
        out["additionalProperties"] = False
    return out


class Fault(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status
        self.message = message


def deser_error(detail):
    return Fault("An error occurred when deserializing the json body of a request: %s." % detail)


class Api:
    """Routes and request-body validators built from one version's OpenAPI document."""

    def __init__(self, version):
        self.version = version
        spec = load_spec(version)
        self.definitions = strict(spec["definitions"])
        self.routes = []
        for template, ops in spec["paths"].items():
            rx = re.compile("^" + re.sub(r"\{[^}]+\}", "([^/]+)", template) + "$")
            for method, op in ops.items():
                if method == "parameters":
                    continue
                body = None
                for p in op.get("parameters", []):
                    if p.get("in") == "body":
                        body = p["schema"]
                self.routes.append((method.upper(), rx, template, body))

    def route(self, method, path):
        """(template, path parameters, body schema) for a request, or a Fault like
        Firecracker's for an unknown method/path."""
        for m, rx, template, body in self.routes:
            hit = rx.match(path)
            if m == method and hit:
                return template, hit.groups(), body
        raise Fault("Invalid request method and/or path: %s %s." % (method, path))

    def validate(self, schema, body):
        """Raise a Fault naming the first problem of body against schema ($refs resolved
        into the spec's definitions)."""
        full = dict(schema)
        full["definitions"] = self.definitions
        validator = jsonschema.Draft4Validator(full)
        problems = []
        for e in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
            where = "/".join(str(p) for p in e.path)
            problems.append("%s%s" % ("at `%s`: " % where if where else "", e.message))
        if problems:
            raise deser_error("; ".join(problems))


# ---- Firecracker's behaviour ----

NOT_AFTER_BOOT = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_BOOT = "The requested operation is not supported before starting the microVM."
BOOT_PATH = {"/machine-config", "/boot-source", "/drives/{drive_id}",
             "/network-interfaces/{iface_id}", "/vsock", "/entropy", "/balloon",
             "/mmds/config", "/pmem/{id}", "/cpu-config", "/hotplug/memory", "/serial"}
DEFAULT_BOOT_ARGS = ("reboot=k panic=1 pci=off nomodules 8250.nr_uarts=0 i8042.noaux "
                     "i8042.nomux i8042.nopnp i8042.dumbkbd")


def os_error(e):
    return "%s (os error %d)" % (e.strerror, e.errno)


def rust_os_error(e):
    kinds = {98: "AddrInUse", 2: "NotFound", 13: "PermissionDenied"}
    return 'Os { code: %d, kind: %s, message: "%s" }' % (e.errno, kinds.get(e.errno, "Other"),
                                                          e.strerror)


def parse_vsock_ports(spec):
    ports = {}
    for item in filter(None, spec.split(",")):
        port, _, mode = item.partition("=")
        ports[int(port)] = mode
    return ports


class VsockBackend:
    """Firecracker's vsock device seen from the host: a unix socket at uds_path. A
    connection gets no answer until the guest runs (it has activated its driver; a paused
    guest does not answer either); then `CONNECT <port>\n` is answered `OK <host port>\n`
    and the connection is a stream to what listens on that port (FAKE_FC_VSOCK), or
    closed when nothing does, or when the request is not a CONNECT line."""

    MAX_REQUEST = 64

    def __init__(self, machine, uds_path):
        self.machine = machine
        self.uds_path = uds_path
        self.conns = set()
        self.lock = threading.Lock()
        self.closed = False
        self.accepted = {}  # port -> connections seen (late:N)
        self.next_port = 1 << 30  # the host ports Firecracker assigns start here
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(host(uds_path))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(16)
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.closed:
                    conn.close()
                    return
                self.conns.add(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def drop(self, conn):
        with self.lock:
            self.conns.discard(conn)
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()

    def reset(self):
        with self.lock:
            conns, self.conns = list(self.conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.machine.cond:
            self.machine.cond.notify_all()

    def close(self):
        with self.lock:
            self.closed = True
        self.sock.close()
        self.reset()

    def request(self, conn):
        line = b""
        while not line.endswith(b"\n") and len(line) <= self.MAX_REQUEST:
            c = conn.recv(1)
            if not c:
                return None
            line += c
        m = re.match(rb"^CONNECT (\d+)\n$", line)
        return int(m.group(1)) if m else None

    def serve(self, conn):
        m = self.machine
        try:
            with m.cond:  # the device answers once the guest runs
                m.cond.wait_for(lambda: m.state == "Running" or conn not in self.conns)
            if conn not in self.conns:
                return
            port = self.request(conn)
            mode = m.vsock_ports.get(port) if port is not None else None
            n = self.accepted.get(port, 0)
            self.accepted[port] = n + 1
            if mode and mode.startswith("late:"):
                mode = "echo" if n >= int(mode[5:]) else None
            m.log({"event": "vsock-connect", "port": port, "mode": mode})
            if mode is None:
                return  # nothing listens on that port: Firecracker closes the connection
            self.answer(conn, mode)
        except OSError:
            pass
        finally:
            self.drop(conn)

    def answer(self, conn, mode):
        ok = ("OK %d\n" % self.next_port).encode()
        self.next_port += 1
        if mode == "garbage":
            conn.sendall(b"NOPE 1\n")
        elif mode == "long":
            conn.sendall(b"OK " + b"9" * 200)
        elif mode == "nonl":
            conn.sendall(b"OK 5")
            return
        elif mode.startswith("serve:"):
            conn.sendall(ok)
            fd = conn.fileno()
            subprocess.run(["/bin/sh", "-c", 'exec "$0" --serve-fd 3 3<&"$1"', mode[6:], str(fd)],
                           pass_fds=(fd,), stdin=subprocess.DEVNULL, check=False)
            return
        elif mode in ("echo", "hello"):
            conn.sendall(ok + (b"HELLO\n" if mode == "hello" else b""))
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        # garbage, long, silent: hold the connection until the peer goes
        while conn.recv(65536):
            pass


def vtuple(v):
    return tuple(int(x) for x in v.split(".")[:3])


class Machine:
    """One Firecracker process: its resources and its state."""

    def __init__(self, version, instance_id, log):
        self.version = version
        self.id = instance_id
        self.log = log
        self.state = "Not started"
        self.boot_path = False  # a boot resource was configured: no snapshot load any more
        self.logger_path = None
        self.metrics_path = None
        self.machine = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                        "track_dirty_pages": False}
        self.boot = None
        self.drives = {}
        self.nets = {}
        self.exit_after = None  # exit status once the response is sent
        self.cond = threading.Condition()  # state changes, for the vsock connections
        self.vsock = None  # the device ({guest_cid, uds_path}) and its listener
        self.vsock_backend = None
        self.vsock_ports = parse_vsock_ports(os.environ.get("FAKE_FC_VSOCK", "1024=echo"))

    def set_state(self, state):
        with self.cond:
            self.state = state
            self.cond.notify_all()

    @property
    def started(self):
        return self.state != "Not started"

    def console(self, line):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def vmm_log(self, line):
        if self.logger_path:
            try:
                fd = os.open(host(self.logger_path), os.O_RDWR | os.O_APPEND | os.O_NONBLOCK)
                try:
                    os.write(fd, ("[fake-firecracker:%s] %s\n" % (self.id, line)).encode())
                finally:
                    os.close(fd)
            except OSError:
                pass

    def opened(self, path):
        st = os.stat(host(path))
        self.log({"event": "open", "path": path, "dev": st.st_dev, "ino": st.st_ino})

    # -- dispatch --

    def handle(self, method, template, params, body):
        if (method == "PUT" and template in BOOT_PATH) or (method == "PATCH" and
                                                           template == "/machine-config"):
            if self.started:
                raise Fault(NOT_AFTER_BOOT)
            self.boot_path = True
        name = "%s %s" % (method, template)
        fn = {
            "GET /": self.get_info,
            "GET /version": self.get_version,
            "GET /machine-config": self.get_machine_config,
            "GET /vm/config": self.get_vm_config,
            "PUT /logger": self.put_logger,
            "PUT /metrics": self.put_metrics,
            "PUT /machine-config": self.put_machine_config,
            "PATCH /machine-config": self.patch_machine_config,
            "PUT /boot-source": self.put_boot_source,
            "PUT /drives/{drive_id}": self.put_drive,
            "PATCH /drives/{drive_id}": self.patch_drive,
            "PUT /network-interfaces/{iface_id}": self.put_net,
            "PATCH /network-interfaces/{iface_id}": self.patch_net,
            "PUT /actions": self.put_actions,
            "PATCH /vm": self.patch_vm,
            "PUT /snapshot/create": self.put_snapshot_create,
            "PUT /snapshot/load": self.put_snapshot_load,
            "PUT /vsock": self.put_vsock,
        }.get(name)
        if fn is None:
            if method != "GET" and not self.started:
                return None  # a valid pre-boot resource this fake does not model: accept
            raise Fault("fake-firecracker: %s is valid but not modelled by this test server"
                        % name)
        return fn(params, body)

    # -- reads --

    def get_info(self, params, body):
        return {"app_name": "Firecracker", "id": self.id, "state": self.state,
                "vmm_version": self.version}

    def get_version(self, params, body):
        return {"firecracker_version": self.version}

    def get_machine_config(self, params, body):
        return dict(self.machine)

    def get_vm_config(self, params, body):
        out = {"boot-source": self.boot or {}, "drives": list(self.drives.values()),
               "machine-config": self.machine,
               "network-interfaces": list(self.nets.values())}
        if self.vsock:
            out["vsock"] = dict(self.vsock)
        return out

    # -- pre-boot resources --

    def existing_file(self, path, what):
        # as Firecracker opens them (read-write, non-blocking: a FIFO or a pipe works too)
        try:
            os.close(os.open(host(path), os.O_RDWR | os.O_NONBLOCK))
            return path
        except OSError as e:
            raise Fault("%s: Failed to open target file: %s" % (what, os_error(e)))

    def put_logger(self, params, body):
        if self.started:
            raise Fault(NOT_AFTER_BOOT)
        if "log_path" in body:  # Firecracker opens the file, it does not create it
            self.logger_path = self.existing_file(body["log_path"], "Logger error")
        return None

    def put_metrics(self, params, body):
        if self.started:
            raise Fault(NOT_AFTER_BOOT)
        self.metrics_path = self.existing_file(body["metrics_path"], "Metrics error")
        return None

    def check_machine(self, m):
        if m["mem_size_mib"] <= 0:
            raise Fault("Machine config error: The memory size (MiB) is invalid.")
        if m.get("smt") and m["vcpu_count"] > 1 and m["vcpu_count"] % 2:
            raise Fault("Machine config error: The vCPU number is invalid! The vCPU number "
                        "can only be 1 or an even number when SMT is enabled.")

    def put_machine_config(self, params, body):
        m = {"vcpu_count": body["vcpu_count"], "mem_size_mib": body["mem_size_mib"],
             "smt": body.get("smt", False),
             "track_dirty_pages": body.get("track_dirty_pages", False)}
        self.check_machine(m)
        self.machine = m
        return None

    def patch_machine_config(self, params, body):
        m = dict(self.machine)
        m.update(body)
        self.check_machine(m)
        self.machine = m
        return None

    def put_boot_source(self, params, body):
        for key, what in (("kernel_image_path", "kernel"), ("initrd_path", "initrd")):
            if key in body:
                try:
                    open(host(body[key]), "rb").close()
                except OSError as e:
                    raise Fault("Boot source error: The %s file cannot be opened: %s"
                                % (what, os_error(e)))
        self.boot = dict(body)
        return None

    def check_id(self, path_id, body_id):
        if not re.match(r"^\w+$", path_id):
            raise Fault("API Resource IDs can only contain alphanumeric characters and "
                        "underscores.")
        if path_id != body_id:
            raise Fault("The id from the path [%s] does not match the id from the body [%s]!"
                        % (path_id, body_id))

    def put_drive(self, params, body):
        self.check_id(params[0], body["drive_id"])
        if "path_on_host" in body:
            try:  # Firecracker opens the backing file when the drive is configured
                open(host(body["path_on_host"]), "rb" if body.get("is_read_only") else "r+b").close()
            except OSError as e:
                raise Fault("Drive config error: Unable to create the virtio block device: "
                            "Virtio backend error: Error manipulating the backing file: %s %s"
                            % (os_error(e), body["path_on_host"]))
        if body.get("is_root_device") and any(d.get("is_root_device") and k != params[0]
                                              for k, d in self.drives.items()):
            raise Fault("Drive config error: A root block device already exists!")
        self.drives[params[0]] = dict(body)
        return None

    def patch_drive(self, params, body):
        if not self.started:
            raise Fault(NOT_BEFORE_BOOT)
        self.check_id(params[0], body["drive_id"])
        if params[0] not in self.drives:
            raise Fault("Drive config error: Invalid block device ID!")
        self.drives[params[0]].update(body)
        return None

    def put_net(self, params, body):
        self.check_id(params[0], body["iface_id"])
        mac = body.get("guest_mac")
        if mac is not None and not re.match(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", mac):
            raise deser_error("invalid MAC address `%s`" % mac)
        for k, n in self.nets.items():
            if k != params[0] and n["host_dev_name"] == body["host_dev_name"]:
                raise Fault("Network config error: Could not create the network device: "
                            "Open tap device failed: Resource busy (os error 16)")
        self.nets[params[0]] = dict(body)
        return None

    def patch_net(self, params, body):
        if not self.started:
            raise Fault(NOT_BEFORE_BOOT)
        if params[0] not in self.nets:
            raise Fault("Network config error: Invalid network interface ID - not found.")
        return None

    def bind_vsock(self, uds_path):
        """The device's listening socket, bound at once (as v1.0 does at PUT /vsock, before
        InstanceStart). An existing path fails (EADDRINUSE), a missing directory too."""
        backend = VsockBackend(self, uds_path)
        st = os.stat(host(uds_path))
        self.log({"event": "vsock-bind", "path": uds_path, "dev": st.st_dev, "ino": st.st_ino})
        return backend

    def put_vsock(self, params, body):
        if "vsock_id" in body:
            self.vmm_log("PUT /vsock: vsock_id field is deprecated.")
        old = self.vsock_backend
        if old:  # a second PUT replaces the device and unlinks the old socket
            old.close()
            try:
                os.unlink(host(old.uds_path))
            except OSError:
                pass
            self.vsock_backend = self.vsock = None
        try:
            self.vsock_backend = self.bind_vsock(body["uds_path"])
        except OSError as e:
            raise Fault("Cannot create backend for vsock device: UnixBind(%s)" % rust_os_error(e))
        self.vsock = {"guest_cid": body["guest_cid"], "uds_path": body["uds_path"]}
        return None

    # -- actions and the running VM --

    def put_actions(self, params, body):
        action = body["action_type"]
        if action == "InstanceStart":
            return self.instance_start()
        if not self.started:
            raise Fault(NOT_BEFORE_BOOT)
        if action == "SendCtrlAltDel":
            # the guest reboots on Ctrl-Alt-Del, and Firecracker exits when its guest does
            self.console("fake-firecracker: Ctrl-Alt-Del: the guest reboots, Firecracker exits")
            self.exit_after = 0
        elif action == "FlushMetrics" and not self.metrics_path:
            raise Fault("Internal VMM error: Metrics error: The metrics system was not "
                        "initialized.")
        return None

    def instance_start(self):
        if self.started:
            raise Fault(NOT_AFTER_BOOT)
        if not self.boot:
            raise Fault("Start microvm error: Cannot start microvm without kernel configuration.")
        for d in self.drives.values():
            if "path_on_host" in d:
                self.opened(d["path_on_host"])
        self.set_state("Running")
        self.console("[    0.000000] Linux version 6.1.0-fake (fake-firecracker %s)" % self.version)
        self.console("[    0.000000] Command line: %s" % self.boot.get("boot_args",
                                                                      DEFAULT_BOOT_ARGS))
        self.console("fake-firecracker: InstanceStart: guest is running")
        self.vmm_log("Running Firecracker v%s" % self.version)
        return None

    def patch_vm(self, params, body):
        if not self.started:
            raise Fault(NOT_BEFORE_BOOT)
        self.set_state("Paused" if body["state"] == "Paused" else "Running")
        self.console("fake-firecracker: vm %s" % self.state.lower())
        return None

    def put_snapshot_create(self, params, body):
        if not self.started:
            raise Fault(NOT_BEFORE_BOOT)
        if self.state != "Paused":
            raise Fault("Create snapshot error: Cannot save microvm state: Vcpu is in "
                        "unexpected state.")
        if body.get("snapshot_type") == "Diff" and not self.machine.get("track_dirty_pages"):
            raise Fault("Create snapshot error: Diff snapshots are not allowed on uVMs with "
                        "dirty page tracking disabled.")
        state = {"fake_firecracker_snapshot": 1, "version": self.version,
                 "machine-config": self.machine, "boot-source": self.boot,
                 "drives": self.drives, "network-interfaces": self.nets,
                 "vsock": self.vsock}
        try:
            with open(host(body["snapshot_path"]), "w") as f:
                json.dump(state, f)
        except OSError as e:
            raise Fault("Create snapshot error: Cannot open snapshot file: %s" % os_error(e))
        try:
            with open(host(body["mem_file_path"]), "wb") as f:
                f.truncate(self.machine["mem_size_mib"] << 20)
        except OSError as e:
            raise Fault("Create snapshot error: Cannot open memory file: %s" % os_error(e))
        if self.vsock_backend:
            # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: the guest drops every connection, and
            # Firecracker closes their host ends; its listener stays
            self.vsock_backend.reset()
        return None

    def load_failed(self, detail):
        """Firecracker considers the process too dirty after a failed load: it answers,
        then exits."""
        self.exit_after = EXIT_BAD_SNAPSHOT
        return Fault("Load snapshot error: Failed to restore from snapshot: %s" % detail)

    def put_snapshot_load(self, params, body):
        if self.started:
            raise Fault(NOT_AFTER_BOOT)
        if self.boot_path:
            raise Fault("Load snapshot error: Loading a microVM snapshot not allowed after "
                        "configuring boot-specific resources.")
        has_file, has_backend = "mem_file_path" in body, "mem_backend" in body
        if has_file == has_backend:
            raise deser_error("too many fields: either `mem_backend` or `mem_file_path` "
                              "exclusively is required" if has_file else
                              "missing field: either `mem_backend` or `mem_file_path` is required")
        mem = body["mem_file_path"] if has_file else body["mem_backend"]["backend_path"]
        if has_backend and body["mem_backend"]["backend_type"] != "File":
            raise self.load_failed("Failed to load guest memory: this fake serves File only")
        try:
            with open(host(body["snapshot_path"])) as f:
                state = json.load(f)
        except OSError as e:
            raise self.load_failed("Failed to get snapshot state from file: Failed to open "
                                   "snapshot file: %s" % os_error(e))
        except ValueError:
            raise self.load_failed("Failed to get snapshot state from file: Failed to load "
                                   "snapshot state from file: Snapshot file is invalid")
        if not isinstance(state, dict) or state.get("fake_firecracker_snapshot") != 1:
            raise self.load_failed("Failed to get snapshot state from file: Snapshot file is "
                                   "invalid")
        if vtuple(state["version"])[:2] != vtuple(self.version)[:2]:
            raise self.load_failed("Failed to get snapshot state from file: The snapshot was "
                                   "made by Firecracker %s; this is %s" % (state["version"],
                                                                          self.version))
        try:
            size = os.stat(host(mem)).st_size
        except OSError as e:
            raise self.load_failed("Failed to load guest memory: %s" % os_error(e))
        if size != state["machine-config"]["mem_size_mib"] << 20:
            raise self.load_failed("Failed to load guest memory: the memory file has %d "
                                   "bytes, the snapshot needs %d" %
                                   (size, state["machine-config"]["mem_size_mib"] << 20))
        for d in state["drives"].values():
            if "path_on_host" in d and not os.path.exists(host(d["path_on_host"])):
                raise self.load_failed("Failed to build microVM from snapshot: Cannot restore "
                                       "devices: Block(BackingFile(Os { code: 2, kind: NotFound, "
                                       "message: \"No such file or directory\" }, \"%s\"))"
                                       % d["path_on_host"])
        vs = state.get("vsock")
        if vs:
            # the device binds its socket again at the path the snapshot recorded (v1.16:
            # or vsock_override's); anything there makes the load fail, and the process end
            if "vsock_override" in body:
                vs = dict(vs, uds_path=body["vsock_override"]["uds_path"])
            try:
                self.vsock_backend = self.bind_vsock(vs["uds_path"])
            except OSError as e:
                raise self.load_failed("Failed to build microVM from snapshot: Cannot restore "
                                       "devices. Error: VsockUnixBackend(UnixBind(%s))"
                                       % rust_os_error(e))
            self.vsock = vs
        for o in body.get("network_overrides", []):
            if o["iface_id"] in state["network-interfaces"]:
                state["network-interfaces"][o["iface_id"]]["host_dev_name"] = o["host_dev_name"]
        self.machine = state["machine-config"]
        self.boot = state["boot-source"]
        self.drives = state["drives"]
        self.nets = state["network-interfaces"]
        for d in self.drives.values():
            if "path_on_host" in d:
                self.opened(d["path_on_host"])
        self.set_state("Running" if body.get("resume_vm") else "Paused")
        self.console("fake-firecracker: snapshot loaded (%s)" % self.state.lower())
        return None


# ---- HTTP/1.1 over the unix socket ----

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           500: "Internal Server Error"}


class Handler(socketserver.StreamRequestHandler):
    """Firecracker's API server: keep-alive, Content-Length bodies, JSON faults."""

    def handle(self):
        with self.server.app.lock:
            self.server.app.connections += 1
            conn = self.server.app.connections
        while True:
            req = self.read_request()
            if req is None:
                return
            method, path, headers, body = req
            if self.server.app.mute:
                continue  # FAKE_FC_MODE=mute: read requests, never answer
            status, payload = self.server.app.respond(method, path, body, conn)
            self.send(status, payload, headers.get("connection", "").lower() == "close")
            if self.server.app.machine.exit_after is not None:
                code = self.server.app.machine.exit_after
                self.server.app.log({"event": "exit", "status": code})
                self.wfile.flush()
                os._exit(code)
            if headers.get("connection", "").lower() == "close":
                return

    def read_request(self):
        line = self.rfile.readline(65536)
        if not line:
            return None
        try:
            method, target, _ = line.decode("latin-1").split()
        except ValueError:
            self.send(400, {"fault_message": "Invalid HTTP request line."}, True)
            return None
        headers = {}
        while True:
            h = self.rfile.readline(65536).decode("latin-1")
            if h in ("\r\n", "\n", ""):
                break
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            # micro_http (Firecracker's HTTP server) does not do chunked bodies
            self.send(400, {"fault_message": "Transfer-Encoding: chunked is not supported."},
                      True)
            return None
        if headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        n = int(headers.get("content-length", "0") or 0)
        body = self.rfile.read(n) if n else None
        return method, target.split("?")[0], headers, body

    def send(self, status, payload, close):
        data = b"" if payload is None else json.dumps(payload).encode()
        head = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Error")),
                "Server: Firecracker API", "Connection: %s" % ("close" if close else "keep-alive")]
        if data:
            head.append("Content-Type: application/json")
        head.append("Content-Length: %d" % len(data))
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)


class App:
    def __init__(self, version, instance_id, log_path):
        self.api = Api(version)
        self.lock = threading.Lock()
        self.log_path = log_path
        self.machine = Machine(version, instance_id, self.log)
        self.connections = 0
        self.mute = False

    def log(self, record):
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def respond(self, method, path, raw, conn=0):
        with self.lock:
            parsed = None
            try:
                parsed = self.parse(method, path, raw)
                payload = self.machine.handle(*parsed)
                status = 204 if payload is None else 200
            except Fault as f:
                status, payload = f.status, {"fault_message": f.message}
            body = parsed[3] if parsed else (raw.decode("utf-8", "replace") if raw else None)
            self.log({"method": method, "path": path, "body": body, "status": status,
                      "conn": conn})
            self.machine.vmm_log("%s %s -> %d%s" % (method, path, status, "" if status < 300
                                 else " " + payload["fault_message"]))
            return status, payload

    def parse(self, method, path, raw):
        template, params, schema = self.api.route(method, path)
        if method == "GET":
            if raw:
                raise Fault("GET request cannot have a body.")
            return method, template, params, None
        if not raw:
            raise Fault("Empty %s request." % method)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise deser_error(str(e))
        if schema is not None:
            self.api.validate(schema, body)
        return method, template, params, body


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


# ---- the fake binary ----

def parse_args(argv):
    opts = {"api_sock": "/run/firecracker.socket", "id": "anonymous-instance"}
    valued = {"--api-sock": "api_sock", "--id": "id", "--seccomp-filter": None,
              "--log-path": None, "--level": None, "--config-file": None,
              "--metadata": None, "--mmds-size-limit": None, "--http-api-max-payload-size": None,
              # what the jailer adds before the caller's arguments
              "--start-time-us": None, "--start-time-cpu-us": None, "--parent-cpu-time-us": None,
              "--root": "root"}
    flags = {"--no-seccomp", "--boot-timer", "--show-level", "--show-log-origin", "--no-api",
             "--version", "--describe-snapshot"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in valued and i + 1 < len(argv):
            if a in opts.get("seen", ()):
                sys.stderr.write("error: The argument '%s' was provided more than once, but "
                                 "cannot be used multiple times\n" % a[2:])
                sys.exit(EXIT_ARG_PARSING)
            opts.setdefault("seen", set()).add(a)
            if valued[a]:
                opts[valued[a]] = argv[i + 1]
            i += 2
            continue
        if a in flags:
            opts[a] = True
            i += 1
            continue
        sys.stderr.write("Arguments parsing error: Found argument '%s' which wasn't expected, "
                         "or isn't valid in this context.\n" % a)
        sys.exit(EXIT_ARG_PARSING)
    return opts


def run_fake(argv):
    version = os.environ.get("FAKE_FC_VERSION", DEFAULT_VERSION)
    global ROOT
    opts = parse_args(argv)
    if opts.get("root"):
        ROOT = opts["root"]
    if opts.get("--version"):
        print("Firecracker v%s\n" % version)
        return 0
    mode = os.environ.get("FAKE_FC_MODE", "normal")
    app = App(version, opts["id"], os.environ.get("FAKE_FC_LOG"))
    app.log({"event": "start", "pid": os.getpid(), "argv": argv, "version": version,
             "netns": os.readlink("/proc/self/ns/net"), "mntns": os.readlink("/proc/self/ns/mnt"),
             "vm_dir": stat_id("/run/fireclaw/vm"), "uid": os.getuid(), "gid": os.getgid(),
             "groups": os.getgroups(), "root": ROOT, "cwd": os.getcwd(),
             "host_pid": int(os.readlink("/proc/self"))})
    if mode == "exit-early":
        sys.stderr.write("fake-firecracker: starting\n"
                         "fake-firecracker: cannot create the VM: Bad file descriptor "
                         "(os error 9)\n")
        return 1
    if mode == "no-listen":
        while True:
            signal.pause()
    path = host(opts["api_sock"])
    if os.path.exists(path):
        # Firecracker never removes its socket file and refuses to start over one
        sys.stderr.write("Error creating the API server: Failed to bind and run the HTTP "
                         "server: IO error: Address in use (os error 98)\n")
        return 1
    server = Server(path, Handler)
    server.app = app
    app.mute = mode == "mute"
    server.serve_forever()
    return 0


def stat_id(path):
    try:
        st = os.stat(path)
        return "%d:%d" % (st.st_dev, st.st_ino)
    except OSError:
        return None


# ---- self-test (TAP) ----

class Tap:
    def __init__(self):
        self.n = 0
        self.failed = 0

    def ok(self, cond, name, diag=None):
        self.n += 1
        print("%s %d - %s" % ("ok" if cond else "not ok", self.n, name))
        if not cond:
            self.failed += 1
            if diag is not None:
                print("#   " + str(diag).replace("\n", "\n#   "))
        sys.stdout.flush()
        return cond

    def skip(self, name, why):
        self.n += 1
        print("ok %d - %s # skip %s" % (self.n, name, why))
        sys.stdout.flush()

    def fault(self, fn, pattern, name):
        try:
            fn()
        except Fault as f:
            return self.ok(re.search(pattern, f.message) is not None, name, f.message)
        return self.ok(False, name, "no fault raised")

    def done(self):
        print("1..%d" % self.n)
        return 1 if self.failed else 0


def http(sock, method, path, body=None):
    """One request on a kept-alive connection; returns (status, decoded body or None)."""
    data = b"" if body is None else (body if isinstance(body, bytes) else
                                     json.dumps(body).encode())
    head = "%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (
        method, path, len(data))
    sock.sendall(head.encode() + data)
    f = sock.makefile("rb")
    status = int(f.readline().split()[1])
    length = 0
    while True:
        h = f.readline().decode()
        if h in ("\r\n", ""):
            break
        if h.lower().startswith("content-length:"):
            length = int(h.split(":")[1])
    raw = f.read(length) if length else b""
    return status, json.loads(raw) if raw else None


def self_test():
    t = Tap()
    apis = {}
    for v in ("1.16.1", "1.0.0"):
        try:
            apis[v] = Api(v)
            t.ok(True, "spec v%s loads" % v)
        except OSError as e:
            t.ok(False, "spec v%s loads" % v, e)
            return t.done()
    # The vendored specs are the official ones, unchanged: where a checkout of the
    # project's shared files sits beside the repository (as on CI), compare.
    outside = os.path.join(HERE, "..", "..", "shared", "firecracker-api")
    for v in ("1.16.1", "1.0.0"):
        name = "firecracker-v%s.yaml" % v
        if not os.path.isfile(os.path.join(outside, name)):
            t.skip("vendored spec v%s matches the official copy" % v,
                   "no ../shared/firecracker-api beside the repository")
            continue
        with open(os.path.join(outside, name), "rb") as a, \
                open(os.path.join(HERE, "..", "vendor", "firecracker-api", name), "rb") as b:
            t.ok(a.read() == b.read(), "vendored spec v%s matches the official copy" % v)
    new, old = apis["1.16.1"], apis["1.0.0"]
    t.ok("Off" in new.definitions["Logger"]["properties"]["level"]["enum"],
         "YAML 'Off' stays a string in the v1.16.1 Logger enum")
    tpl, params, schema = new.route("PUT", "/drives/rootfs")
    t.ok(tpl == "/drives/{drive_id}" and params == ("rootfs",), "templated path matched")
    t.fault(lambda: new.route("PUT", "/no-such-thing"),
            r"^Invalid request method and/or path: PUT /no-such-thing\.$", "unknown path → 400")
    t.fault(lambda: new.route("DELETE", "/vm"), "Invalid request method", "unknown method → 400")
    t.fault(lambda: old.route("PUT", "/entropy"), "Invalid request method",
            "v1.0.0 has no /entropy")

    def check(api, path, body, method="PUT"):
        api.validate(api.route(method, path)[2], body)

    good_drive = {"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": True,
                  "is_read_only": False}
    try:
        check(new, "/drives/rootfs", good_drive)
        check(old, "/drives/rootfs", good_drive)
        check(new, "/boot-source", {"kernel_image_path": "/k", "boot_args": "console=ttyS0"})
        check(new, "/snapshot/load", {"snapshot_path": "/s", "resume_vm": True,
                                      "mem_backend": {"backend_type": "File",
                                                      "backend_path": "/m"}})
        check(old, "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"})
        t.ok(True, "valid bodies pass on both versions")
    except Fault as f:
        t.ok(False, "valid bodies pass on both versions", f.message)
    t.fault(lambda: check(new, "/boot-source", {"boot_args": "x"}),
            "'kernel_image_path' is a required property", "missing required field named")
    t.fault(lambda: check(new, "/boot-source", {"kernel_image_path": 5}),
            "kernel_image_path.*5 is not of type 'string'", "wrong type named")
    t.fault(lambda: check(new, "/boot-source", {"kernel_image_path": "/k", "bogus": 1}),
            "'bogus' was unexpected", "unknown field rejected (deny_unknown_fields)")
    t.fault(lambda: check(new, "/actions", {"action_type": "Reboot"}),
            "'Reboot' is not one of", "enum checked")
    t.fault(lambda: check(new, "/machine-config", {"vcpu_count": 0, "mem_size_mib": 256}),
            "vcpu_count.*less than the minimum", "minimum checked")
    t.fault(lambda: check(new, "/drives/rootfs", dict(good_drive, rate_limiter={
        "bandwidth": {"size": "big", "refill_time": 1}})),
            "rate_limiter/bandwidth/size", "$ref into definitions resolved (nested TokenBucket)")
    t.fault(lambda: check(old, "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {
        "backend_type": "File", "backend_path": "/m"}}),
            "'mem_backend' was unexpected", "v1.0.0 rejects mem_backend")
    t.fault(lambda: check(old, "/snapshot/load", {"snapshot_path": "/s"}),
            "'mem_file_path' is a required property", "v1.0.0 requires mem_file_path")
    t.fault(lambda: check(old, "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m",
                                                  "network_overrides": []}),
            "'network_overrides' was unexpected", "v1.0.0 has no network_overrides")
    t.fault(lambda: check(old, "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True}),
            "'path_on_host' is a required property", "v1.0.0 requires path_on_host")

    check(old, "/vsock", {"guest_cid": 3, "uds_path": "/v.sock"})
    t.fault(lambda: check(old, "/vsock", {"guest_cid": 2, "uds_path": "/v.sock"}),
            "guest_cid.*less than the minimum", "/vsock: the spec's minimum CID (3)")
    t.fault(lambda: check(new, "/vsock", {"guest_cid": 3}),
            "'uds_path' is a required property", "/vsock: uds_path required")
    t.fault(lambda: check(old, "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m",
                                                  "vsock_override": {"uds_path": "/x"}}),
            "'vsock_override' was unexpected", "v1.0.0 has no vsock_override")

    live_test(t)
    live_vsock(t)
    return t.done()


def live_vsock(t):
    """The vsock socket: bound at PUT, silent until the guest runs, CONNECT answered,
    other ports closed, connections reset by a snapshot, bound again by a load."""
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "vmlinux"), "w").close()
        app = App("1.0.0", "vsock", None)
        app.machine.console = lambda line: None
        path = os.path.join(d, "v.sock")

        def call(method, route, body=None, a=app):
            try:
                parsed = a.parse(method, route, json.dumps(body).encode() if body else None)
                return 204, a.machine.handle(*parsed)
            except Fault as f:
                return f.status, f.message

        st, msg = call("PUT", "/vsock", {"guest_cid": 3, "uds_path": os.path.join(d, "vmlinux")})
        t.ok(st == 400 and "UnixBind(Os { code: 98, kind: AddrInUse" in msg,
             "an existing path: 400 AddrInUse", msg)
        st, _ = call("PUT", "/vsock", {"guest_cid": 3, "uds_path": path})
        t.ok(st == 204 and stat.S_ISSOCK(os.stat(path).st_mode), "PUT /vsock binds its socket at once")
        early = socket.socket(socket.AF_UNIX)
        early.connect(path)
        early.sendall(b"CONNECT 1024\n")
        early.settimeout(0.3)
        try:
            got = early.recv(100)
        except socket.timeout:
            got = "silence"
        t.ok(got == "silence", "before the guest runs: no answer, not closed", got)
        call("PUT", "/boot-source", {"kernel_image_path": os.path.join(d, "vmlinux")})
        call("PUT", "/actions", {"action_type": "InstanceStart"})
        early.settimeout(5)
        t.ok(early.recv(100) == b"OK 1073741824\n", "once running, the waiting CONNECT is answered")
        early.sendall(b"echo")
        t.ok(early.recv(100) == b"echo", "and the stream reaches the guest's listener (echo)")
        for req, name in ((b"CONNECT 7\n", "a port nothing listens on"),
                          (b"HELLO\n", "a request that is not CONNECT")):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.settimeout(5)
            s.sendall(req)
            t.ok(s.recv(100) == b"", name + ": the connection is closed")
            s.close()
        call("PATCH", "/vm", {"state": "Paused"})
        snap, mem = os.path.join(d, "state"), os.path.join(d, "mem")
        call("PUT", "/snapshot/create", {"snapshot_path": snap, "mem_file_path": mem})
        t.ok(early.recv(100) == b"", "a snapshot resets the open connection")
        early.close()
        with open(snap) as f:
            t.ok(json.load(f).get("vsock") == {"guest_cid": 3, "uds_path": path},
                 "the snapshot records the device and its path")
        clone = App("1.0.0", "clone", None)
        st, msg = call("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_file_path": mem}, clone)
        t.ok(st == 400 and "VsockUnixBackend(UnixBind(Os { code: 98" in msg
             and clone.machine.exit_after == EXIT_BAD_SNAPSHOT,
             "a load over an existing socket file fails, and the process ends", msg)
        os.unlink(path)
        clone = App("1.0.0", "clone2", None)
        clone.machine.console = lambda line: None
        st, _ = call("PUT", "/snapshot/load", {"snapshot_path": snap, "mem_file_path": mem,
                                               "resume_vm": True}, clone)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        ok = st == 204 and stat.S_ISSOCK(os.stat(path).st_mode)
        if ok:
            s.connect(path)
            s.sendall(b"CONNECT 1024\n")
            ok = s.recv(100) == b"OK 1073741824\n"
        t.ok(ok, "a load binds the recorded path again, and it answers")
        s.close()
        for a in (app, clone):
            if a.machine.vsock_backend:
                a.machine.vsock_backend.close()


def live_test(t):
    """Serve on a temp socket in this process and talk HTTP to it."""
    with tempfile.TemporaryDirectory() as d:
        kernel = os.path.join(d, "vmlinux")
        open(kernel, "w").close()
        app = App("1.16.1", "selftest", None)
        out = []
        app.machine.console = out.append
        server = Server(os.path.join(d, "api.sock"), Handler)
        server.app = app
        th = threading.Thread(target=server.serve_forever, daemon=True)
        th.start()
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.path.join(d, "api.sock"))
        st, body = http(s, "GET", "/version")
        t.ok(st == 200 and body == {"firecracker_version": "1.16.1"}, "GET /version", body)
        st, body = http(s, "PUT", "/actions", {"action_type": "InstanceStart"})
        t.ok(st == 400 and "without kernel configuration" in body["fault_message"],
             "InstanceStart before boot-source → 400 (same connection: keep-alive)", body)
        st, body = http(s, "PUT", "/boot-source", b"{not json")
        t.ok(st == 400 and body["fault_message"].startswith(
            "An error occurred when deserializing the json body"), "bad JSON → 400", body)
        st, body = http(s, "PUT", "/boot-source", {"kernel_image_path": d + "/missing"})
        t.ok(st == 400 and "No such file or directory" in body["fault_message"],
             "missing kernel → 400", body)
        st, body = http(s, "PATCH", "/vm", {"state": "Paused"})
        t.ok(st == 400 and body["fault_message"] == NOT_BEFORE_BOOT, "PATCH /vm before start",
             body)
        st, _ = http(s, "PUT", "/boot-source", {"kernel_image_path": kernel,
                                                "boot_args": "console=ttyS0"})
        t.ok(st == 204, "PUT /boot-source → 204")
        st, _ = http(s, "PUT", "/actions", {"action_type": "InstanceStart"})
        t.ok(st == 204 and any("Command line: console=ttyS0" in o for o in out),
             "InstanceStart → 204 and a boot log on the console", out)
        st, body = http(s, "PUT", "/boot-source", {"kernel_image_path": kernel})
        t.ok(st == 400 and body["fault_message"] == NOT_AFTER_BOOT, "pre-boot-only after start",
             body)
        st, body = http(s, "PUT", "/snapshot/create", {"snapshot_path": d + "/s",
                                                       "mem_file_path": d + "/m"})
        t.ok(st == 400 and "Vcpu is in unexpected state" in body["fault_message"],
             "snapshot/create while running → 400", body)
        st, body = http(s, "GET", "/")
        t.ok(st == 200 and body["state"] == "Running", "GET / says Running", body)
        s.close()
        server.shutdown()
        server.server_close()


def main(argv):
    if not argv or argv == ["--self-test"]:
        return self_test()
    return run_fake(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
