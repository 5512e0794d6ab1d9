"""A process on a pseudo-terminal, read from its master side: read_until(pattern) returns
what came up to the first match (decoded; the rest stays buffered for the next call), or
None on timeout or when the terminal closed."""
import os, re, select, time


class PtyReader:
    def __init__(self, fd, timeout):
        self.fd = fd  # the master side
        self.buf = b""
        self.timeout = timeout  # read_until's default, in seconds

    def read_until(self, pattern, timeout=None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        rx = re.compile(pattern.encode())
        while not rx.search(self.buf):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    return None
                if not data:
                    return None
                self.buf += data
        m = rx.search(self.buf)
        out, self.buf = self.buf[: m.end()], self.buf[m.end():]
        return out.decode(errors="replace")
