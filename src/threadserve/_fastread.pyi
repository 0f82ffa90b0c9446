from typing import SupportsIndex

def poll_recv(
    fd: SupportsIndex,
    stop_fd: SupportsIndex,
    bufsize: SupportsIndex,
    timeout_ms: SupportsIndex = -1,
    /,
) -> bytes | int | None: ...
