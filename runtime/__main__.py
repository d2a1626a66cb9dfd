"""python -m blobstore.runtime: the blob-run command line."""
import sys

from .cli import main

sys.exit(main())
