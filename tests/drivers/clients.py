"""What the Python driver checks share."""
import threading


def run_clients(n, client):
    """Runs client(i) for i in 0..n, each in its own thread, all at once; raises with
    the first failures once all are done."""
    errors = []

    def run(i):
        try:
            client(i)
        except Exception as e:  # reported below, once every client is done
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
