"""``weightship mirror``: a read-only server that speaks the Hugging Face Hub's download protocol
for the verified model directories under a root, so any Hub client can pull from it."""

from weightship.mirror.app import create_app
from weightship.mirror.repos import MirrorRoot
from weightship.mirror.server import MirrorServer

__all__ = ["MirrorRoot", "MirrorServer", "create_app"]
