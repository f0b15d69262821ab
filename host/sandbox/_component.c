/*
 * One call of a component's `handle-request(function, request) -> result<string, string>` (or `-> string`)
 * in a single native call: budget, call, reading the result, post-return, fuel reading.
 *
 * Why: wasmtime-py's component API lowers and lifts every value in Python (it re-reads the function's
 * type through ctypes and converts each value with a ctypes structure per call): ~150 us of a 100-byte
 * echo, around a few microseconds of wasmtime. Here the two strings go to wasmtime as they are and the
 * reply comes back as bytes. As in _native.c, the wasmtime functions are not linked: component.py hands
 * us their addresses, taken from the libwasmtime that wasmtime-py loaded, so there is one wasmtime in the
 * process and nothing to build against but Python.h.
 *
 * What this relies on (tests/host/test_component_native.py checks each against the installed wasmtime):
 *  - the layout of wasmtime_component_val_t (a u8 kind, then a union at offset 8; a string is a
 *    wasm_name_t {size_t size; char *data}; a result is {bool is_ok; wasmtime_component_val_t *val}) and
 *    the kinds STRING = 12, RESULT = 19, as wasmtime-py's generated bindings declare them;
 *  - wasmtime_component_func_call only reads its arguments (it copies them into Rust values) and
 *    *assigns* its results, dropping what the result slots held: the slots must hold a valid value
 *    (zeroed = `false`) before the call, and are ours to free with wasmtime_component_val_delete after;
 *  - a host function's callback is (env, context, function type, args, nargs, results, nresults) -> error,
 *    wasmtime owns (and drops) the arguments, and it runs the env's finalizer when it drops the function,
 *    also when defining it fails.
 *
 * Safety:
 *  - A string handed to wasmtime must be UTF-8: wasmtime's C API unwraps the conversion and a bad byte
 *    aborts the whole process (a Rust panic across the C boundary). Both strings are checked here, in C,
 *    right before the call, whatever the caller checked before.
 *  - Strings the guest returns are checked by wasmtime while lifting (a bad one is a trap, not a panic),
 *    and their length is checked against max_output before anything is copied into Python.
 *  - Only the export whose signature inspect_component verified at load is called, and the result's
 *    kinds are checked again before they are read.
 *
 * The GIL is released while the guest runs, as in _native.c: the epoch ticker is a Python thread, and
 * host functions (wasmtime-py's ctypes callbacks, and log_trampoline below) take the GIL back themselves.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if PY_VERSION_HEX >= 0x030D0000
#define IS_FINALIZING() Py_IsFinalizing()
#else
#define IS_FINALIZING() _Py_IsFinalizing()
#endif

typedef struct {
    size_t size;
    const char *data;
} name_t;

typedef struct val val_t;

typedef struct {
    bool is_ok;
    val_t *val;
} valresult_t;

/* Only the members we touch; `pad` gives the union the size of the largest member (a variant:
 * a name and a pointer), so that an array of values or a result slot is laid out as wasmtime's. */
typedef union {
    uint32_t u32;
    name_t string;
    valresult_t result;
    struct {
        name_t name;
        void *val;
    } pad;
} valunion_t;

struct val {
    uint8_t kind;
    valunion_t of;
};

enum { KIND_U32 = 6, KIND_STRING = 12, KIND_RESULT = 19 };

typedef void *(*func_call_fn)(const void *func, void *ctx, const val_t *args, size_t nargs, val_t *results,
                              size_t nresults);
typedef void *(*post_return_fn)(const void *func, void *ctx);
typedef void (*val_delete_fn)(val_t *val);
typedef void *(*set_fuel_fn)(void *ctx, uint64_t fuel);
typedef void *(*get_fuel_fn)(const void *ctx, uint64_t *out);
typedef void (*set_deadline_fn)(void *ctx, uint64_t ticks);
typedef void *(*error_new_fn)(const char *message);
typedef void *(*host_callback_fn)(void *env, void *ctx, const void *type, val_t *args, size_t nargs, val_t *results,
                                  size_t nresults);
typedef void *(*add_func_fn)(void *linker_instance, const char *name, size_t name_len, host_callback_fn callback,
                             void *env, void (*finalizer)(void *));

static func_call_fn p_call;
static post_return_fn p_post_return;
static val_delete_fn p_val_delete;
static set_fuel_fn p_set_fuel;
static get_fuel_fn p_get_fuel;
static set_deadline_fn p_set_deadline;
static error_new_fn p_error_new;
static add_func_fn p_add_func;

enum {
    CC_OK = 0,              /* ok = 1 for ok(...) or a plain string, 0 for err(...); a = fuel left,
                               b = 1 when the guest's stdout or stderr pipe has something to read */
    CC_WASM_ERROR = 1,      /* a = wasmtime_error_t* (owned by the caller now) */
    CC_NOT_UTF8 = 2,        /* a = 0 (function name) or 1 (request), b = offset of the first bad byte */
    CC_REPLY_TOO_LARGE = 3, /* a = the reply's length */
    CC_BAD_RESULT = 4,      /* a = the kind found where a string or result was expected */
};

/* The offset of the first byte that makes `s` invalid UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF; what Rust's String::from_utf8 accepts), or -1 when it is valid. */
static Py_ssize_t utf8_error_at(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if ((w & 0x8080808080808080ULL) == 0) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xBF; /* the range of the second byte */
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c == 0xE0)
            need = 2, lo = 0xA0;
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
            need = 2;
        else if (c == 0xED)
            need = 2, hi = 0x9F;
        else if (c == 0xF0)
            need = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3)
            need = 3;
        else if (c == 0xF4)
            need = 3, hi = 0x8F;
        else
            return (Py_ssize_t)i;
        if (n - i <= need || s[i + 1] < lo || s[i + 1] > hi)
            return (Py_ssize_t)i;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return (Py_ssize_t)i;
        i += need + 1;
    }
    return -1;
}

static PyObject *component_bind(PyObject *self, PyObject *args) {
    unsigned long long call, post_return, val_delete, set_fuel, get_fuel, set_deadline, error_new, add_func;
    if (!PyArg_ParseTuple(args, "KKKKKKKK", &call, &post_return, &val_delete, &set_fuel, &get_fuel, &set_deadline,
                          &error_new, &add_func))
        return NULL;
    if (!call || !post_return || !val_delete || !set_fuel || !get_fuel || !set_deadline || !error_new || !add_func) {
        PyErr_SetString(PyExc_ValueError, "a wasmtime function address is 0");
        return NULL;
    }
    p_call = (func_call_fn)(uintptr_t)call;
    p_post_return = (post_return_fn)(uintptr_t)post_return;
    p_val_delete = (val_delete_fn)(uintptr_t)val_delete;
    p_set_fuel = (set_fuel_fn)(uintptr_t)set_fuel;
    p_get_fuel = (get_fuel_fn)(uintptr_t)get_fuel;
    p_set_deadline = (set_deadline_fn)(uintptr_t)set_deadline;
    p_error_new = (error_new_fn)(uintptr_t)error_new;
    p_add_func = (add_func_fn)(uintptr_t)add_func;
    Py_RETURN_NONE;
}

/* layout() -> (sizeof value, offset of the union, offsets of string.size / string.data / result.is_ok /
 * result.val within the union, kinds STRING / RESULT / U32): what this file assumes, for the test that
 * compares it with wasmtime-py's bindings of the installed wasmtime. */
static PyObject *component_layout(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("(nnnnnniii)", (Py_ssize_t)sizeof(val_t), (Py_ssize_t)offsetof(val_t, of),
                         (Py_ssize_t)offsetof(name_t, size), (Py_ssize_t)offsetof(name_t, data),
                         (Py_ssize_t)offsetof(valresult_t, is_ok), (Py_ssize_t)offsetof(valresult_t, val),
                         KIND_STRING, KIND_RESULT, KIND_U32);
}

/* utf8_error_at(data) -> offset of the first invalid byte, or -1 (exposed for the differential test). */
static PyObject *component_utf8_error_at(PyObject *self, PyObject *args) {
    const char *s;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y#", &s, &n))
        return NULL;
    return PyLong_FromSsize_t(utf8_error_at((const uint8_t *)s, (size_t)n));
}

static const char EMPTY[1] = "";

/* Whether either read end has something for the host (data, or the write end closed). One poll() instead
 * of a read per pipe that fails with EAGAIN: host/sandbox/guest_output.py drains only when there is. */
static int output_pending(int out_fd, int err_fd) {
    struct pollfd fds[2] = {{out_fd, POLLIN, 0}, {err_fd, POLLIN, 0}};
    int r = poll(fds, 2, 0);
    return r != 0; /* an error (-1) also sends the host to look */
}

/* call(ctx, func, function, request, max_output, fuel, ticks, out_fd, err_fd)
 *   -> (code, ok, reply | None, a, b); a negative fd is ignored by poll(). */
static PyObject *component_call(PyObject *self, PyObject *args) {
    unsigned long long ctx_a, func_a, max_output, ticks;
    long long fuel;
    const char *fname, *payload;
    Py_ssize_t fname_len, n;
    int out_fd, err_fd;
    if (!PyArg_ParseTuple(args, "KKy#y#KLKii", &ctx_a, &func_a, &fname, &fname_len, &payload, &n, &max_output,
                          &fuel, &ticks, &out_fd, &err_fd))
        return NULL;
    if (p_call == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sandbus.host.sandbox._component.bind() was not called");
        return NULL;
    }
    if (ctx_a == 0 || func_a == 0) {
        PyErr_SetString(PyExc_ValueError, "null store context or function");
        return NULL;
    }
    Py_ssize_t bad = utf8_error_at((const uint8_t *)fname, (size_t)fname_len);
    if (bad >= 0)
        return Py_BuildValue("(iiOnn)", CC_NOT_UTF8, 0, Py_None, (Py_ssize_t)0, bad);
    bad = utf8_error_at((const uint8_t *)payload, (size_t)n);
    if (bad >= 0)
        return Py_BuildValue("(iiOnn)", CC_NOT_UTF8, 0, Py_None, (Py_ssize_t)1, bad);

    void *ctx = (void *)(uintptr_t)ctx_a;
    const void *func = (const void *)(uintptr_t)func_a;
    val_t argv[2], result;
    memset(argv, 0, sizeof argv);
    memset(&result, 0, sizeof result); /* kind 0 = bool false: wasmtime drops the slot's old value */
    argv[0].kind = KIND_STRING;
    argv[0].of.string.size = (size_t)fname_len;
    argv[0].of.string.data = fname_len ? fname : EMPTY;
    argv[1].kind = KIND_STRING;
    argv[1].of.string.size = (size_t)n;
    argv[1].of.string.data = n ? payload : EMPTY;

    void *err = NULL;
    uint64_t fuel_left = 0;
    int code = CC_OK, ok = 1, have_result = 0, pending = 0;
    unsigned long long a = 0;
    const val_t *text = NULL;

    Py_BEGIN_ALLOW_THREADS
    do {
        if (fuel >= 0 && (err = p_set_fuel(ctx, (uint64_t)fuel)) != NULL) {
            code = CC_WASM_ERROR;
            break;
        }
        p_set_deadline(ctx, ticks);
        err = p_call(func, ctx, argv, 2, &result, 1);
        if (err != NULL) {
            code = CC_WASM_ERROR;
            break;
        }
        have_result = 1;
        /* Before anything else can enter the instance; it frees the guest's copy of the reply, not ours. */
        err = p_post_return(func, ctx);
        if (err != NULL) {
            code = CC_WASM_ERROR;
            break;
        }
        if (result.kind == KIND_STRING) {
            text = &result;
        } else if (result.kind == KIND_RESULT) {
            ok = result.of.result.is_ok ? 1 : 0;
            text = result.of.result.val; /* NULL for a payload-less case: an empty string */
            if (text != NULL && text->kind != KIND_STRING) {
                code = CC_BAD_RESULT;
                a = text->kind;
                break;
            }
        } else {
            code = CC_BAD_RESULT;
            a = result.kind;
            break;
        }
        if (text != NULL && text->of.string.size > max_output) {
            code = CC_REPLY_TOO_LARGE;
            a = text->of.string.size;
            break;
        }
        if (fuel >= 0) {
            void *ferr = p_get_fuel(ctx, &fuel_left);
            if (ferr != NULL) { /* cannot happen on a fuel engine; report it rather than a made-up number */
                err = ferr;
                code = CC_WASM_ERROR;
                break;
            }
        }
        pending = output_pending(out_fd, err_fd);
    } while (0);
    Py_END_ALLOW_THREADS

    PyObject *reply = NULL;
    if (code == CC_OK) {
        if (text == NULL || text->of.string.size == 0)
            reply = PyBytes_FromStringAndSize(NULL, 0);
        else
            reply = PyBytes_FromStringAndSize(text->of.string.data, (Py_ssize_t)text->of.string.size);
        a = fuel_left;
    } else if (code == CC_WASM_ERROR) {
        a = (unsigned long long)(uintptr_t)err;
    }
    if (have_result)
        p_val_delete(&result);
    if (code == CC_OK && reply == NULL)
        return NULL;
    if (reply == NULL) {
        reply = Py_None;
        Py_INCREF(reply);
    }
    return Py_BuildValue("(iiNKi)", code, ok, reply, a, pending);
}

/* ---------------------------------------------------------------------------------------------
 * The host interface's `log(level: u32, message: string)` without wasmtime-py's callback wrapper (which
 * re-reads the function's type and converts each value through ctypes: ~25 us of a ~3 us job). The guest
 * calls it on every request that logs, so it is the one host function done here.
 *
 * The Python callable gets (level, message as bytes: UTF-8, checked by wasmtime when it lifted it) and
 * must not raise: it records its failure for the call to report (component.py) and returns False, and
 * the guest's call then fails with a wasmtime error. wasmtime owns the argument values (it drops them
 * after we return); log has no results.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject *fn; /* strong */
} host_env_t;

static void *log_trampoline(void *env, void *ctx, const void *type, val_t *args, size_t nargs, val_t *results,
                            size_t nresults) {
    host_env_t *e = env;
    if (nargs != 2 || nresults != 0 || args[0].kind != KIND_U32 || args[1].kind != KIND_STRING)
        return p_error_new("host function log: unexpected arguments");
    const char *data = args[1].of.string.size ? args[1].of.string.data : EMPTY;
    void *err = NULL;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(e->fn, "Iy#", (unsigned int)args[0].of.u32, data,
                                        (Py_ssize_t)args[1].of.string.size);
    if (r == NULL) {
        /* Only building the arguments can fail here (no memory): the callable itself does not raise. */
        PyErr_Clear();
        err = p_error_new("host function log failed: no memory");
    } else {
        if (r != Py_True)
            err = p_error_new("host function log failed");
        Py_DECREF(r);
    }
    PyGILState_Release(gil);
    return err;
}

/* Runs when wasmtime drops the linked function (with the linker, or with the last store that used it): on
 * the thread that deletes it, a Python thread. At interpreter exit the callable is left alone: taking the
 * GIL then is what aborted processes before (guest_output.py). */
static void host_env_free(void *data) {
    host_env_t *e = data;
    if (e == NULL)
        return;
    if (Py_IsInitialized() && !IS_FINALIZING()) {
        PyGILState_STATE gil = PyGILState_Ensure();
        Py_XDECREF(e->fn);
        PyGILState_Release(gil);
    }
    free(e);
}

/* add_log(linker_instance, name, fn) -> wasmtime_error_t* as an int (0: defined) */
static PyObject *component_add_log(PyObject *self, PyObject *args) {
    unsigned long long li;
    const char *name;
    Py_ssize_t name_len;
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "Ky#O", &li, &name, &name_len, &fn))
        return NULL;
    if (p_add_func == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sandbus.host.sandbox._component.bind() was not called");
        return NULL;
    }
    if (li == 0 || !PyCallable_Check(fn) || utf8_error_at((const uint8_t *)name, (size_t)name_len) >= 0) {
        PyErr_SetString(PyExc_ValueError, "a linker instance, a UTF-8 name and a callable are needed");
        return NULL;
    }
    host_env_t *e = malloc(sizeof *e);
    if (e == NULL)
        return PyErr_NoMemory();
    Py_INCREF(fn);
    e->fn = fn;
    void *err = p_add_func((void *)(uintptr_t)li, name, (size_t)name_len, log_trampoline, e, host_env_free);
    /* On failure wasmtime has already run the finalizer (it owned `e` from the call on). */
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)err);
}

static PyMethodDef methods[] = {
    {"bind", component_bind, METH_VARARGS,
     "bind(func_call, post_return, val_delete, set_fuel, get_fuel, set_deadline, error_new, add_func): C-API "
     "addresses"},
    {"call", component_call, METH_VARARGS,
     "call(ctx, func, function, request, max_output, fuel, ticks, out_fd, err_fd) -> (code, ok, reply, a, b)"},
    {"add_log", component_add_log, METH_VARARGS,
     "add_log(linker_instance, name, fn): define the host interface's log as a native trampoline to fn"},
    {"layout", component_layout, METH_NOARGS, "layout() -> the value layout this module assumes"},
    {"utf8_error_at", component_utf8_error_at, METH_VARARGS,
     "utf8_error_at(data) -> offset of the first invalid UTF-8 byte, or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sandbus.host.sandbox._component", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__component(void) { return PyModule_Create(&module); }
