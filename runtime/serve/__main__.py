"""python -m blobstore.runtime.serve: the blob-serve command line."""
import sys

from .cli import main

sys.exit(main())
