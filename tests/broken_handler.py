"""A handler module that raises when imported: a worker cannot start with it."""

raise RuntimeError("this handler module is broken on purpose")
