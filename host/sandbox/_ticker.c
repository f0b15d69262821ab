/*
 * The epoch ticker as a native thread: every interval it increments the epoch of each registered
 * wasmtime engine, without the GIL.
 *
 * Why: the ticker wakes 200 times a second. As a Python thread it had to take the GIL at every wake,
 * which made the event loop hand the GIL over and take it back each time (two context switches and a
 * cold cache): about 4 us of a node's CPU per request at 12,000 requests/s (bench/bench_bus.py). An
 * epoch increment is an atomic add in the engine (wasmtime_engine_increment_epoch is documented as safe
 * to call from any thread), so nothing here needs Python.
 *
 * The increment function's address comes from the libwasmtime that wasmtime-py loaded (as for
 * _native.c): one wasmtime in the process, nothing to link. Engines are registered once and never
 * released here: the caller keeps each one alive for the life of the process (a reference the
 * interpreter's teardown never releases), so this thread ticks until the process ends, through atexit
 * handlers that may still run guests whose timeouts depend on it. stop() is for switching to the
 * Python ticker. After a fork the child has no thread; it starts again on the next start().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

typedef void (*increment_fn)(void *engine);

#define MAX_ENGINES 64

static increment_fn p_increment;
static void *engines[MAX_ENGINES];
static int n_engines;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t thread;
static int running;
static volatile int stopping;
static long long interval_ns;

static void *tick_main(void *arg) {
    struct timespec ts;
    ts.tv_sec = (time_t)(interval_ns / 1000000000LL);
    ts.tv_nsec = (long)(interval_ns % 1000000000LL);
    while (!stopping) {
        struct timespec left = ts;
        while (nanosleep(&left, &left) == -1 && errno == EINTR && !stopping)
            ;
        pthread_mutex_lock(&lock);
        for (int i = 0; i < n_engines; i++)
            p_increment(engines[i]);
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* Only the forking thread survives a fork: the ticker is gone, and the lock may be held by it. */
    pthread_mutex_init(&lock, NULL);
    running = 0;
    stopping = 0;
}

static PyObject *ticker_start(PyObject *self, PyObject *args) {
    unsigned long long increment;
    long long ns;
    if (!PyArg_ParseTuple(args, "KL", &increment, &ns))
        return NULL;
    if (!increment || ns < 100000 || ns > 1000000000LL) {
        PyErr_SetString(PyExc_ValueError, "start(increment_address, interval_ns): a non-zero address and "
                                          "an interval of 0.1 ms to 1 s");
        return NULL;
    }
    if (running)
        Py_RETURN_FALSE;
    p_increment = (increment_fn)(uintptr_t)increment;
    interval_ns = ns;
    stopping = 0;
    int err = pthread_create(&thread, NULL, tick_main, NULL);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    running = 1;
    Py_RETURN_TRUE;
}

static PyObject *ticker_add(PyObject *self, PyObject *args) {
    unsigned long long engine;
    if (!PyArg_ParseTuple(args, "K", &engine))
        return NULL;
    if (!engine) {
        PyErr_SetString(PyExc_ValueError, "add(engine_address): the address is 0");
        return NULL;
    }
    int added = 0;
    pthread_mutex_lock(&lock);
    int known = 0;
    for (int i = 0; i < n_engines; i++)
        known |= engines[i] == (void *)(uintptr_t)engine;
    if (known) {
        added = 1;
    } else if (n_engines < MAX_ENGINES) {
        engines[n_engines++] = (void *)(uintptr_t)engine;
        added = 1;
    }
    pthread_mutex_unlock(&lock);
    return PyBool_FromLong(added);
}

static PyObject *ticker_stop(PyObject *self, PyObject *noargs) {
    if (running) {
        stopping = 1;
        Py_BEGIN_ALLOW_THREADS
        pthread_join(thread, NULL);
        Py_END_ALLOW_THREADS
        running = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *ticker_running(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(running);
}

static PyMethodDef methods[] = {
    {"start", ticker_start, METH_VARARGS,
     "start(increment_address, interval_ns) -> bool: start the thread (False: it runs already)"},
    {"add", ticker_add, METH_VARARGS, "add(engine_address) -> bool: tick this engine too (False: too many)"},
    {"stop", ticker_stop, METH_NOARGS, "stop(): end the thread and wait for it"},
    {"running", ticker_running, METH_NOARGS, "running() -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sandbus.host.sandbox._ticker", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ticker(void) {
    if (pthread_atfork(NULL, NULL, after_fork_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    return PyModule_Create(&module);
}
