/* threadserve._speedups: socket calls that keep the GIL when they cannot block.
 *
 * CPython's socket methods release the GIL around every system call, even a
 * recv whose data is already queued or a send into a free buffer: calls that
 * take a microsecond. With many connection threads, each release hands the
 * GIL to another runnable thread and wakes it, and the caller then waits to
 * get it back: a context switch or two per call, where the call itself was
 * not going to wait. These two functions make the same system calls with
 * MSG_DONTWAIT *without* releasing the GIL, and say "would block" instead of
 * waiting. The caller (Connection's hot path) then waits in poll(), which
 * releases the GIL as usual, so a thread lets others run only when it has
 * nothing to do.
 *
 * Both take the socket object, not its number (see socket_fd), and are for
 * plain TCP and Unix sockets only: on a TLS socket they would bypass TLS.
 * Connection falls back to the standard socket methods when this module is
 * not built or THREADSERVE_PURE_PYTHON=1 is set; the tests run both ways.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/types.h>

/* A send of more than this goes through the GIL-releasing path: copying a
 * large buffer into the kernel takes long enough to matter to other threads. */
#define MAX_SEND_HOLDING_GIL (64 * 1024)

/* Python ignores SIGPIPE anyway; this also spares a handler-installing host. */
#ifdef MSG_NOSIGNAL
#define SEND_FLAGS (MSG_DONTWAIT | MSG_NOSIGNAL)
#else
#define SEND_FLAGS MSG_DONTWAIT
#endif

typedef struct {
    PyObject *fileno_name; /* "fileno", interned once */
} speedups_state;

/* The socket's descriptor, read while holding the GIL, as CPython's own
 * socket methods do: a close() from another thread needs the GIL too, so
 * it cannot slip in between this and a call made without releasing it. A
 * closed socket reports -1, and the call fails with EBADF as
 * socket.recv would, never reaching a descriptor number already reused. */
static int
socket_fd(PyObject *module, PyObject *sock)
{
    speedups_state *state = (speedups_state *)PyModule_GetState(module);
    PyObject *result = PyObject_CallMethodNoArgs(sock, state->fileno_name);
    if (result == NULL) {
        return -1;
    }
    long fd = PyLong_AsLong(result);
    Py_DECREF(result);
    if (fd == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (fd < 0 || fd > INT_MAX) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return (int)fd;
}

static int
would_block(int error)
{
    return error == EAGAIN || error == EWOULDBLOCK || error == EINTR;
}

PyDoc_STRVAR(recv_nowait_doc,
"recv_nowait(sock, size, /) -> bytes | None\n\n"
"recv(2) with MSG_DONTWAIT, holding the GIL: the bytes queued (b'' at end of\n"
"stream), or None when nothing is queued (or a signal interrupted the call).");

static PyObject *
recv_nowait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv_nowait(sock, size) takes two arguments");
        return NULL;
    }
    int fd = socket_fd(module, args[0]);
    if (fd < 0) {
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "size must be positive");
        return NULL;
    }
    PyObject *buffer = PyBytes_FromStringAndSize(NULL, size);
    if (buffer == NULL) {
        return NULL;
    }
    ssize_t received = recv(fd, PyBytes_AS_STRING(buffer), (size_t)size, MSG_DONTWAIT);
    if (received < 0) {
        int error = errno;
        Py_DECREF(buffer);
        if (would_block(error)) {
            Py_RETURN_NONE;
        }
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (received != size && _PyBytes_Resize(&buffer, received) < 0) {
        return NULL;
    }
    return buffer;
}

PyDoc_STRVAR(send_nowait_doc,
"send_nowait(sock, data, /) -> int\n\n"
"send(2) with MSG_DONTWAIT | MSG_NOSIGNAL: the count the kernel took, 0 when\n"
"the send buffer is full. Holds the GIL for up to 64 KiB; a larger send is\n"
"made with the GIL released (it still does not wait).");

static PyObject *
send_nowait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send_nowait(sock, data) takes two arguments");
        return NULL;
    }
    int fd = socket_fd(module, args[0]);
    if (fd < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    ssize_t sent;
    int error = 0;
    if (view.len <= MAX_SEND_HOLDING_GIL) {
        sent = send(fd, view.buf, (size_t)view.len, SEND_FLAGS);
        if (sent < 0) {
            error = errno;
        }
    }
    else {
        Py_BEGIN_ALLOW_THREADS
        sent = send(fd, view.buf, (size_t)view.len, SEND_FLAGS);
        if (sent < 0) {
            error = errno;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    if (sent < 0) {
        if (would_block(error)) {
            return PyLong_FromLong(0);
        }
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef speedups_methods[] = {
    {"recv_nowait", (PyCFunction)(void (*)(void))recv_nowait, METH_FASTCALL, recv_nowait_doc},
    {"send_nowait", (PyCFunction)(void (*)(void))send_nowait, METH_FASTCALL, send_nowait_doc},
    {NULL, NULL, 0, NULL},
};

static int
speedups_exec(PyObject *module)
{
    speedups_state *state = (speedups_state *)PyModule_GetState(module);
    state->fileno_name = PyUnicode_InternFromString("fileno");
    return state->fileno_name == NULL ? -1 : 0;
}

static int
speedups_traverse(PyObject *module, visitproc visit, void *arg)
{
    speedups_state *state = (speedups_state *)PyModule_GetState(module);
    Py_VISIT(state->fileno_name);
    return 0;
}

static int
speedups_clear(PyObject *module)
{
    speedups_state *state = (speedups_state *)PyModule_GetState(module);
    Py_CLEAR(state->fileno_name);
    return 0;
}

static PyModuleDef_Slot speedups_slots[] = {
    {Py_mod_exec, speedups_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    /* Nothing here relies on the GIL for safety: each call touches only its
     * own buffer and a descriptor the caller owns. */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "threadserve._speedups",
    .m_doc = "Socket calls that keep the GIL when they cannot block (see _fastio.py).",
    .m_size = sizeof(speedups_state),
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
    .m_traverse = speedups_traverse,
    .m_clear = speedups_clear,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
