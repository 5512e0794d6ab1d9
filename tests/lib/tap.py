"""TAP for the Python tests: ok() prints "ok N - name" (or "not ok", with the diagnostic
as "#" lines), done() prints the plan and exits 1 if any failed. (tests/lib/tap.sh and
tap.lua are the same for shell and Lua.)"""
import sys

n = failed = 0


def ok(cond, name, diag=""):
    global n, failed
    n += 1
    if not cond:
        failed += 1
    print(("ok" if cond else "not ok"), n, "-", name)
    if not cond and diag:
        print("\n".join("#   " + l for l in str(diag).splitlines()))
    sys.stdout.flush()
    return cond


def done():
    print("1..%d" % n)
    sys.exit(1 if failed else 0)
