"""A plain TCP service for the benchmarks: accepts and closes, forever."""
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, port))
server.listen(128)
while True:
    conn, _ = server.accept()
    conn.close()
