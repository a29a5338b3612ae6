"""Backups of every domain of a host in one run (``backup --all``): which domains, how their
backups run side by side, and the status file monitoring reads."""
