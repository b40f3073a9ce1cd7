"""Black-box ban latency: complete a handshake to a decoy, then connect to a real service
in a tight loop; the time from the decoy handshake to the first refused/timed-out connect
is how long the defender took to drop us. Prints milliseconds, or 'never'."""
import socket
import sys
import time

victim, decoy, service = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limit = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0

try:
    s = socket.create_connection((victim, decoy), 1.0)
    t0 = time.perf_counter()
    s.close()
except ConnectionRefusedError:
    # Stealth/advanced modes leave decoys closed: the refused SYN is the probe.
    t0 = time.perf_counter()
while time.perf_counter() - t0 < limit:
    attempt = time.perf_counter()
    try:
        c = socket.create_connection((victim, service), 0.05)
        c.close()
    except OSError:
        print(f"{(attempt - t0) * 1000:.3f}")
        sys.exit(0)
print("never")
