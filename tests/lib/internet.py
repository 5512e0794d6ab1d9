#!/usr/bin/python3
# internet.py: the tests' "internet", run inside a namespace the test made
# (tests/netpol.sh): a DNS server and HTTP servers on test addresses. Nothing here
# reaches any other address.
#
#   internet.py [--dns IP] [--records FILE] [--http IP:PORT]...
#
# DNS (UDP, port 53 on IP): A queries for the names in FILE (JSON: {"name": [ip, ip…]})
# are answered with TTL 0; a name with several addresses answers the next one at each A
# query (the second lookup of a name gets the second address: a DNS answer that changes).
# Other names: NXDOMAIN; other query types of a known name: no answer. HTTP: GET / answers
# "hello from IP:PORT". Prints "ready" once every socket is bound, then serves until killed.
import json
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_name(msg, off):
    labels = []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            return ".".join(labels).lower(), off
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n


def dns_loop(sock, records_path):
    turn = {}
    while True:
        msg, peer = sock.recvfrom(512)
        if len(msg) < 12:
            continue
        qid, _flags, qd = struct.unpack("!HHH", msg[:6])
        if qd != 1:
            continue
        name, off = parse_name(msg, 12)
        qtype, _qclass = struct.unpack("!HH", msg[off:off + 4])
        question = msg[12:off + 4]
        try:
            with open(records_path) as f:
                records = json.load(f)
        except (OSError, ValueError):
            records = {}
        answers = b""
        rcode = 0
        if name not in records:
            rcode = 3
        elif qtype == 1:
            ips = records[name]
            i = turn.get(name, 0)
            turn[name] = i + 1
            ip = ips[min(i, len(ips) - 1)]
            answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(ip)
        flags = 0x8180 | rcode
        head = struct.pack("!HHHHHH", qid, flags, 1, 1 if answers else 0, 0, 0)
        sock.sendto(head + question + answers, peer)


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from %s:%d\n" % self.server.server_address).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main(argv):
    dns, records, https = None, None, []
    i = 0
    while i < len(argv):
        if argv[i] == "--dns":
            dns = argv[i + 1]
        elif argv[i] == "--records":
            records = argv[i + 1]
        elif argv[i] == "--http":
            ip, port = argv[i + 1].rsplit(":", 1)
            https.append((ip, int(port)))
        else:
            sys.exit("internet.py: unknown argument " + argv[i])
        i += 2
    threads = []
    if dns:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((dns, 53))
        threads.append(threading.Thread(target=dns_loop, args=(s, records), daemon=True))
    for addr in https:
        srv = ThreadingHTTPServer(addr, Hello)
        threads.append(threading.Thread(target=srv.serve_forever, daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
