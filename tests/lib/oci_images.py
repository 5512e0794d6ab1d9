#!/usr/bin/python3
# Container images for tests/oci.sh, made locally (no registry is reachable):
#   oci_images.py BUSYBOX OUTDIR
# writes, from a static busybox binary:
#   OUTDIR/layout/      an OCI image layout (index.json, blobs/sha256/…) of image "app":
#       layer 1: a busybox userland (/bin/sh …), /etc/passwd with user app (uid 1000),
#                /data/{keep,gone,replaced}, /opq/{old1,old2}, /entry.sh
#       layer 2 (gzip): deletes /data/gone (.wh.gone), replaces /data/replaced, makes /opq
#                opaque (.wh..wh..opq) with /opq/new only, adds /etc/layer2
#       config: Env GREETING + PATH, WorkingDir /work, Entrypoint [/entry.sh], Cmd [default]
#   OUTDIR/app.tar      the same image as a docker save tarball (manifest.json, plain tars)
#   OUTDIR/distroless.tar  docker save of a "distroless" image: only /app/busybox (no
#       /bin/sh, no /etc/passwd, no libc), Entrypoint [/app/busybox, echo, distroless ok]
#   OUTDIR/user.tar     docker save of layer 1 with User "app" (run as uid 1000)
#   OUTDIR/hostile-*.tar   docker save images with one hostile layer each (tests/oci.sh)
#   OUTDIR/escape.tar   layer 1 makes /esc -> OUTDIR/outside (absolute symlink), layer 2
#       writes /esc/pwned: must land inside the image, never in OUTDIR/outside
import gzip, hashlib, io, json, os, sys, tarfile

busybox, out = sys.argv[1], sys.argv[2]
BB = open(busybox, "rb").read()


def tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for e in entries:
            name, kind = e[0], e[1]
            i = tarfile.TarInfo(name)
            i.mtime = 1700000000
            i.uid = e[3] if len(e) > 3 else 0
            i.gid = i.uid
            if kind == "dir":
                i.type, i.mode = tarfile.DIRTYPE, 0o755
                t.addfile(i)
            elif kind == "file":
                data = e[2]
                i.size, i.mode = len(data), (0o755 if data.startswith(b"#!") or data[:4] == b"\x7fELF" else 0o644)
                t.addfile(i, io.BytesIO(data))
            elif kind == "link":
                i.type, i.linkname = tarfile.SYMTYPE, e[2]
                t.addfile(i)
            elif kind == "hard":
                i.type, i.linkname = tarfile.LNKTYPE, e[2]
                t.addfile(i)
            elif kind == "chr":
                i.type, i.devmajor, i.devminor = tarfile.CHRTYPE, 1, 3
                t.addfile(i)
    return buf.getvalue()


APPLETS = ["sh", "cat", "ls", "echo", "env", "pwd", "id", "test", "[", "printf", "ln", "mkdir", "rm", "grep"]
entry = b"""#!/bin/sh
if [ "$1" = default ]; then
\techo "entry: $GREETING in $(pwd) as $(id -u)"
else
\texec "$@"
fi
"""
layer1 = [("bin", "dir"), ("bin/busybox", "file", BB)] + [("bin/" + a, "link", "busybox") for a in APPLETS] + [
    ("etc", "dir"),
    ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"),
    ("etc/group", "file", b"root:x:0:\napp:x:1000:\n"),
    ("home", "dir"), ("home/app", "dir", None, 1000), ("work", "dir"),
    ("data", "dir"), ("data/keep", "file", b"kept from layer 1\n"), ("data/gone", "file", b"should be deleted\n"),
    ("data/replaced", "file", b"old content\n"),
    ("opq", "dir"), ("opq/old1", "file", b"old1\n"), ("opq/old2", "file", b"old2\n"),
    ("entry.sh", "file", entry),
]
layer2 = [
    ("data", "dir"), ("data/.wh.gone", "file", b""), ("data/replaced", "file", b"new content from layer 2\n"),
    ("opq", "dir"), ("opq/.wh..wh..opq", "file", b""), ("opq/new", "file", b"new in opaque dir\n"),
    ("etc", "dir"), ("etc/layer2", "file", b"layer 2 was here\n"),
]
CONFIG = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from the image"], "WorkingDir": "/work",
          "Entrypoint": ["/entry.sh"], "Cmd": ["default"]}


def sha(b):
    return hashlib.sha256(b).hexdigest()


def config_blob(cfg, layers):
    return json.dumps({"architecture": "amd64", "os": "linux", "config": cfg,
                       "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(l) for l in layers]}}).encode()


def oci_layout(path, layers, cfg):
    os.makedirs(path + "/blobs/sha256", exist_ok=True)

    def put(b):
        open(path + "/blobs/sha256/" + sha(b), "wb").write(b)
        return "sha256:" + sha(b)
    descs = []
    for i, l in enumerate(layers):
        blob = gzip.compress(l, mtime=0) if i == 1 else l
        mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if i == 1 else "")
        descs.append({"mediaType": mt, "digest": put(blob), "size": len(blob)})
    c = config_blob(cfg, layers)
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(c), "size": len(c)},
                    "layers": descs}).encode()
    md = put(m)
    open(path + "/oci-layout", "w").write('{"imageLayoutVersion": "1.0.0"}')
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
               "digest": md, "size": len(m), "annotations": {"org.opencontainers.image.ref.name": "app:test"}}]},
              open(path + "/index.json", "w"))


def docker_save(path, layers, cfg, tag):
    files = []
    names = []
    for l in layers:
        n = sha(l) + "/layer.tar"
        files.append((n, l))
        names.append(n)
    c = config_blob(cfg, layers)
    files.append((sha(c) + ".json", c))
    files.append(("manifest.json", json.dumps([{"Config": sha(c) + ".json", "RepoTags": [tag], "Layers": names}]).encode()))
    with tarfile.open(path, "w") as t:
        for n, b in files:
            i = tarfile.TarInfo(n)
            i.size = len(b)
            t.addfile(i, io.BytesIO(b))


os.makedirs(out, exist_ok=True)
l1, l2 = tar_bytes(layer1), tar_bytes(layer2)
oci_layout(out + "/layout", [l1, l2], CONFIG)
docker_save(out + "/app.tar", [l1, l2], CONFIG, "app:test")
docker_save(out + "/distroless.tar", [tar_bytes([("app", "dir"), ("app/busybox", "file", BB)])],
            {"Entrypoint": ["/app/busybox", "echo", "distroless ok"]}, "distroless:test")
docker_save(out + "/user.tar", [l1], dict(CONFIG, User="app", WorkingDir="/home/app"), "user:test")
outside = out + "/outside"
os.makedirs(outside, exist_ok=True)
HOSTILE = {
    "dotdot": [("../../pwned-dotdot", "file", b"x")],
    "link-then-file": [("esc", "link", outside), ("esc/pwned-link", "file", b"x")],
    "rel-link-then-file": [("esc", "link", "../../../../../../.." + outside), ("esc/pwned-rel", "file", b"x")],
    "hardlink-out": [("hl", "hard", "../../../../../../../etc/hostname")],
}
for name, entries in HOSTILE.items():
    docker_save(out + "/hostile-" + name + ".tar", [l1, tar_bytes(entries)], CONFIG, "hostile:" + name)
# absolute symlinks across layers, and a device node: imported, contained
docker_save(out + "/escape.tar", [l1, tar_bytes([("esc", "link", outside), ("dev-null", "chr")]),
                                  tar_bytes([("esc", "dir"), ("esc/pwned", "file", b"inside the image\n")])],
            CONFIG, "escape:test")
