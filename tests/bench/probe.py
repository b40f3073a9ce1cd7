"""Black-box ban latency: complete a handshake to a decoy, then connect to a real service
in a tight loop; the time from the decoy handshake to the first refused/timed-out connect
is how long the defender took to drop us. Prints milliseconds, or 'never'.

Usage: probe.py VICTIM DECOY SERVICE [LIMIT_S [syn]]. With `syn` (stealth and advanced
modes, whose decoys stay closed) the probe is a lone SYN sent without waiting for its
answer, so a defender that drops it (a kernel tripwire) is timed too; the clock starts
when the SYN is sent."""
import socket
import sys
import time

victim, decoy, service = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limit = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
syn_only = len(sys.argv) > 5 and sys.argv[5] == "syn"

if syn_only:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    t0 = time.perf_counter()
    s.connect_ex((victim, decoy))  # EINPROGRESS: the SYN is on its way
else:
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
