"""Speak RESP to Redis with the standard library only: AUTH (password on stdin, if any), PING,
then CONFIG GET bind (which the redis role disables)."""

import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
password = sys.stdin.read().strip()


def command(sock, *args):
    """Send one command and return Redis's first reply line."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    sock.sendall(payload.encode())
    return sock.makefile("rb").readline().decode().strip()


with socket.create_connection((host, port), timeout=5) as sock:
    if password:
        print(command(sock, "AUTH", password))
    print(command(sock, "PING"))
    print(command(sock, "CONFIG", "GET", "bind"))
