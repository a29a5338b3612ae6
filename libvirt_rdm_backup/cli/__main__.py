"""``python -m libvirt_rdm_backup.cli``: the ``rdm-backup`` command."""

import sys

from libvirt_rdm_backup.cli import main

sys.exit(main())
