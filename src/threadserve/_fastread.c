/*
 * The read of Connection.recv's hot path, compiled: wait on the client socket
 * and the stop descriptor, then read, in one release of the GIL.
 *
 * Why: in Python the same read is `poll.poll()` and then `socket.recv()`.
 * Each call gives the GIL up and takes it back, and with many connection
 * threads every take may wait behind another thread; each also builds
 * Python objects (the event list, its tuples) that are thrown away at once.
 * Here both system calls run with the GIL given up once, and the only
 * object made is the bytes returned (`python -m bench.cost_per_request`
 * measures the difference: its "ts, pure-Python reads" row).
 *
 * The module is optional. If it did not build, or THREADSERVE_PURE_PYTHON is
 * set, _connection.py does the same in Python (see _accel.py), and the test
 * suite runs the reading tests both ways.
 *
 * Only the usual case is handled here: data, end of stream, the stop, and a
 * wait of at most timeout_ms (the caller's idle, lifetime or frame deadline).
 * Everything else is handed back to the general path in Python, which raises
 * the timeout once the deadline has passed, and knows TLS and the stop budget.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>

#define SOCKET_EVENTS (POLLIN | POLLPRI)

PyDoc_STRVAR(poll_recv_doc,
"poll_recv(fd, stop_fd, bufsize, timeout_ms=-1, /)\n"
"--\n"
"\n"
"Wait until fd or stop_fd is readable, then read up to bufsize bytes from fd.\n"
"\n"
"Returns the bytes read (b\"\" at end of stream) when only fd was ready.\n"
"Returns an int when stop_fd was ready: 1 if fd had input too, else 0;\n"
"nothing is read then. Returns None when there was nothing to read after all\n"
"(spurious readiness), a signal interrupted the wait, or timeout_ms passed\n"
"first: the caller waits again its own way (and finds its deadline passed).\n"
"A negative timeout_ms waits without limit. Raises OSError for any other\n"
"error of poll() or recv().");

static PyObject *
poll_recv(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 && nargs != 4) {
        PyErr_Format(PyExc_TypeError, "poll_recv() takes 3 or 4 arguments (%zd given)", nargs);
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long stop_fd = PyLong_AsLong(args[1]);
    if (stop_fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* Any integer-like bufsize, as socket.recv takes (a numpy frame length, say). */
    Py_ssize_t bufsize = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (bufsize == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX || stop_fd < 0 || stop_fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError,
                        "poll_recv(): file descriptors must be from 0 to INT_MAX");
        return NULL;
    }
    if (bufsize <= 0) {
        PyErr_SetString(PyExc_ValueError, "poll_recv(): bufsize must be > 0");
        return NULL;
    }
    int timeout_ms = -1;
    if (nargs == 4) {
        long timeout = PyLong_AsLong(args[3]);
        if (timeout == -1 && PyErr_Occurred()) {
            return NULL;
        }
        /* As poll() takes it: negative is no limit; beyond INT_MAX ms (24
           days) is clamped, and the caller's deadline check still holds. */
        timeout_ms = timeout < 0 ? -1 : (timeout > INT_MAX ? INT_MAX : (int)timeout);
    }
    struct pollfd fds[2] = {
        {.fd = (int)fd, .events = SOCKET_EVENTS, .revents = 0},
        {.fd = (int)stop_fd, .events = POLLIN, .revents = 0},
    };
    int ready;
    int error = 0;
    ssize_t received = -1;
    char *buffer = NULL;
    int no_buffer = 0;
    Py_BEGIN_ALLOW_THREADS
    ready = poll(fds, 2, timeout_ms);
    if (ready < 0) {
        error = errno;
    }
    else if (ready > 0 && fds[1].revents == 0) {
        /* The buffer is taken only now, once there is input: a connection
           waiting for its client holds none (with thousands idle, that
           would be thousands of bufsize buffers). malloc needs no GIL. */
        buffer = malloc((size_t)bufsize);
        if (buffer == NULL) {
            no_buffer = 1;
        }
        else {
            /* The socket is non-blocking: this never waits. */
            received = recv((int)fd, buffer, (size_t)bufsize, 0);
            if (received < 0) {
                error = errno;
            }
        }
    }
    Py_END_ALLOW_THREADS

    if (ready > 0 && fds[1].revents != 0) {
        /* The stop: nothing was read; say whether the client had sent more. */
        return PyLong_FromLong(fds[0].revents != 0);
    }
    if (received >= 0) {
        PyObject *data = PyBytes_FromStringAndSize(buffer, (Py_ssize_t)received);
        free(buffer);
        return data;
    }
    free(buffer);
    if (ready == 0) {
        Py_RETURN_NONE; /* Timed out: the caller's own wait raises the timeout. */
    }
    if (error == EINTR || error == EAGAIN || error == EWOULDBLOCK) {
        Py_RETURN_NONE; /* A signal, or readiness with nothing to read: wait again. */
    }
    if (no_buffer) {
        return PyErr_NoMemory();
    }
    errno = error;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyMethodDef fastread_methods[] = {
    {"poll_recv", (PyCFunction)(void (*)(void))poll_recv, METH_FASTCALL, poll_recv_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot fastread_slots[] = {
#ifdef Py_mod_gil
    /* Free-threaded builds (3.13t): nothing here needs the GIL, so importing
       this must not turn it back on. */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
#ifdef Py_mod_multiple_interpreters
    /* No state: an interpreter with a GIL of its own may import it too. */
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef fastread_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "threadserve._fastread",
    .m_doc = "The compiled read of Connection.recv's hot path (optional; see _accel.py).",
    .m_size = 0,
    .m_methods = fastread_methods,
    .m_slots = fastread_slots,
};

PyMODINIT_FUNC
PyInit__fastread(void)
{
    return PyModuleDef_Init(&fastread_module);
}
