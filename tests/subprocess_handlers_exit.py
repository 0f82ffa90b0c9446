"""A handler module that exits at import, as one that parses sys.argv there might."""

import sys

sys.exit(0)
