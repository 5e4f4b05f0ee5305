"""The watchdog process: supervision of this host's workers, process control, housekeeping rounds."""
