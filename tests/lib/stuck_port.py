#!/usr/bin/env python3
"""A VMM's agent port that accepts a connection and never reads it, as a restored QEMU
sometimes does with a virtio-serial port's first connection (docs/guest-notes.md, "The
agent's virtio-serial ports"). The listening socket is fd 3.

  stuck_port.py AGENT reconnect   the first connection is never read; every later one is
                                  served by an AGENT --serve-fd of its own
  stuck_port.py AGENT never       no connection is ever read
"""
import socket
import subprocess
import sys

agent, mode = sys.argv[1], sys.argv[2]
listener = socket.socket(fileno=3)
held = [listener.accept()[0]]
if mode == "never":
    while True:
        held.append(listener.accept()[0])
while True:  # (the test kills this process; each agent ends with its connection)
    served = listener.accept()[0]
    fd = served.fileno()
    subprocess.Popen([agent, "--serve-fd", str(fd)], pass_fds=(fd,))
    served.close()
