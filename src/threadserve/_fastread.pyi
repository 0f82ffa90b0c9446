from typing import SupportsIndex

def poll_recv(
    fd: SupportsIndex, stop_fd: SupportsIndex, bufsize: SupportsIndex, /
) -> bytes | int | None: ...
