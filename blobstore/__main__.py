"""python -m blobstore: the blob-pack command line."""
import sys

from .cli import main

sys.exit(main())
