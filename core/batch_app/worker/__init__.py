"""The worker process: one engine, one model; the loop, its heartbeat, result writer and wake-ups."""
