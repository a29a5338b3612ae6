"""Running ``backup --all`` on a schedule: the systemd units shipped in ``units/``, their
per-target texts (:mod:`.texts`) and their installation (:mod:`.install`)."""
