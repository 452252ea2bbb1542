"""How long a small write + fsync takes on this disk when nothing else runs: a probe that
tells the machine's own fsync stalls from the pipeline's. Appends 100 bytes and fsyncs
every 20 ms for SECONDS (default 250), prints each fsync over 8 ms with its UTC time, then
p50 / p99 / max.

    python3 benches/fsync_probe.py [SECONDS] [FILE]
"""

import datetime
import os
import sys
import time


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 250.0
    path = sys.argv[2] if len(sys.argv) > 2 else "fsync_probe.dat"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    took = []
    end = time.time() + seconds
    try:
        while time.time() < end:
            start = time.perf_counter()
            os.write(fd, b"x" * 100)
            os.fsync(fd)
            ms = (time.perf_counter() - start) * 1000
            took.append(ms)
            if ms > 8:
                now = datetime.datetime.now(datetime.timezone.utc).time()
                print(f"{now} fsync {ms:.1f} ms", flush=True)
            time.sleep(0.02)
    finally:
        os.close(fd)
        os.unlink(path)
    took.sort()
    print(
        f"n {len(took)} p50 {took[len(took) // 2]:.2f} ms, "
        f"p99 {took[int(len(took) * 0.99)]:.2f}, max {took[-1]:.1f}"
    )


if __name__ == "__main__":
    main()
