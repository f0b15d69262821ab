/*
 * One ABI round trip (budget, alloc, write, call, read, dealloc, fuel and memory readings) in a
 * single native call.
 *
 * Why: through ctypes, each of the ~12 C-API calls of a round trip costs ~0.7-1 us of argument
 * conversion, so a 100-byte echo spent ~10 us in ctypes around ~2 us of wasm. Here the whole
 * sequence is one Python call. The wasmtime functions are not linked: host/sandbox/native.py hands
 * us their addresses, taken from the libwasmtime that wasmtime-py loaded, so there is exactly one
 * wasmtime in the process and nothing to build against but Python.h.
 *
 * Safety is the same as the ctypes path (host/sandbox/invoke.py): only exports whose signature was
 * verified at load are called; every (ptr, len) is checked against a freshly read memory size before
 * it is touched; the memory base is re-read after every guest call (memory.grow may move it).
 *
 * The GIL is released while guest code runs: the epoch ticker and host functions are Python and
 * need it (a guest spinning with the GIL held could never be interrupted). Host-function callbacks
 * take it back themselves (ctypes callbacks call PyGILState_Ensure).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef union {
    int32_t i32;
    int64_t i64;
    float f32;
    double f64;
    uint8_t v128[16];
    uint32_t anyref;
    uint32_t externref;
    void *funcref;
} val_raw_t;

typedef void *(*call_unchecked_fn)(void *ctx, const void *func, val_raw_t *args, size_t n, void **trap);
typedef uint8_t *(*mem_data_fn)(const void *ctx, const void *mem);
typedef size_t (*mem_size_fn)(const void *ctx, const void *mem);
typedef void *(*set_fuel_fn)(void *ctx, uint64_t fuel);
typedef void *(*get_fuel_fn)(const void *ctx, uint64_t *out);
typedef void (*set_deadline_fn)(void *ctx, uint64_t ticks);

static call_unchecked_fn p_call;
static mem_data_fn p_mem_data;
static mem_size_fn p_mem_size;
static set_fuel_fn p_set_fuel;
static get_fuel_fn p_get_fuel;
static set_deadline_fn p_set_deadline;

enum {
    RT_OK = 0,
    RT_WASM_ERROR = 1,   /* a = wasmtime_error_t*, b = wasm_trap_t* (either may be 0) */
    RT_ALLOC_FAILED = 2, /* a = requested length */
    RT_REPLY_TOO_LARGE = 3, /* a = reply length */
    RT_BAD_INPUT_RANGE = 4, /* a = ptr, b = len, c = memory size */
    RT_BAD_REPLY_RANGE = 5, /* a = ptr, b = len, c = memory size */
};

#define STACK_REPLY 4096

static PyObject *native_bind(PyObject *self, PyObject *args) {
    unsigned long long call, data, size, set_fuel, get_fuel, set_deadline;
    if (!PyArg_ParseTuple(args, "KKKKKK", &call, &data, &size, &set_fuel, &get_fuel, &set_deadline))
        return NULL;
    if (!call || !data || !size || !set_fuel || !get_fuel || !set_deadline) {
        PyErr_SetString(PyExc_ValueError, "a wasmtime function address is 0");
        return NULL;
    }
    p_call = (call_unchecked_fn)(uintptr_t)call;
    p_mem_data = (mem_data_fn)(uintptr_t)data;
    p_mem_size = (mem_size_fn)(uintptr_t)size;
    p_set_fuel = (set_fuel_fn)(uintptr_t)set_fuel;
    p_get_fuel = (get_fuel_fn)(uintptr_t)get_fuel;
    p_set_deadline = (set_deadline_fn)(uintptr_t)set_deadline;
    Py_RETURN_NONE;
}

static PyObject *result(int code, PyObject *reply, unsigned long long a, unsigned long long b,
                        unsigned long long c) {
    if (reply == NULL) {
        reply = Py_None;
        Py_INCREF(reply);
    }
    return Py_BuildValue("(iNKKK)", code, reply, a, b, c);
}

/* round_trip(ctx, mem, alloc, func, dealloc, payload, max_output, fuel, ticks)
 *   -> (code, reply | None, a, b, c); on success a = fuel left (0 without metering), b = memory size. */
static PyObject *native_round_trip(PyObject *self, PyObject *args) {
    unsigned long long ctx_a, mem_a, alloc_a, func_a, dealloc_a, max_output, ticks;
    long long fuel;
    const char *payload;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKKKKy#KLK", &ctx_a, &mem_a, &alloc_a, &func_a, &dealloc_a, &payload, &n,
                          &max_output, &fuel, &ticks))
        return NULL;
    if (p_call == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "host.sandbox._native.bind() was not called");
        return NULL;
    }
    void *ctx = (void *)(uintptr_t)ctx_a, *mem = (void *)(uintptr_t)mem_a;
    const void *alloc = (const void *)(uintptr_t)alloc_a, *func = (const void *)(uintptr_t)func_a;
    const void *dealloc = (const void *)(uintptr_t)dealloc_a;
    val_raw_t buf[2];
    void *err = NULL, *trap = NULL;
    int code = RT_OK;
    unsigned long long a = 0, b = 0, c = 0;
    uint64_t p = 0, rp = 0, rl = 0, fuel_left = 0;
    size_t size = 0;
    char stack[STACK_REPLY];
    char *copy = stack;
    int heap_failed = 0;

    Py_BEGIN_ALLOW_THREADS
    do {
        if (fuel >= 0 && (err = p_set_fuel(ctx, (uint64_t)fuel)) != NULL) {
            code = RT_WASM_ERROR;
            break;
        }
        p_set_deadline(ctx, ticks);
        buf[0].i64 = (int64_t)n;
        err = p_call(ctx, alloc, buf, 1, &trap);
        if (err || trap) {
            code = RT_WASM_ERROR;
            break;
        }
        p = (uint32_t)buf[0].i32;
        if (p == 0 && n) {
            code = RT_ALLOC_FAILED;
            a = (unsigned long long)n;
            break;
        }
        size = p_mem_size(ctx, mem);
        if (p + (uint64_t)n > size) {
            code = RT_BAD_INPUT_RANGE;
            a = p, b = (unsigned long long)n, c = size;
            break;
        }
        if (n)
            memcpy(p_mem_data(ctx, mem) + p, payload, (size_t)n);
        buf[0].i64 = (int64_t)p;
        buf[1].i64 = (int64_t)n;
        err = p_call(ctx, func, buf, 2, &trap);
        if (err || trap) {
            code = RT_WASM_ERROR;
            break;
        }
        uint64_t packed = (uint64_t)buf[0].i64;
        rp = packed >> 32;
        rl = packed & 0xFFFFFFFFu;
        if (rl > max_output) {
            code = RT_REPLY_TOO_LARGE;
            a = rl;
            break;
        }
        size = p_mem_size(ctx, mem);
        if (rp + rl > size) {
            code = RT_BAD_REPLY_RANGE;
            a = rp, b = rl, c = size;
            break;
        }
        if (rl > STACK_REPLY) {
            copy = malloc((size_t)rl);
            if (copy == NULL) {
                heap_failed = 1;
                break;
            }
        }
        /* Copied out before dealloc: the guest may reuse the bytes as soon as they are freed. */
        memcpy(copy, p_mem_data(ctx, mem) + rp, (size_t)rl);
        if (dealloc) {
            buf[0].i64 = (int64_t)rp;
            buf[1].i64 = (int64_t)rl;
            err = p_call(ctx, dealloc, buf, 2, &trap);
            if (!err && !trap && p) {
                buf[0].i64 = (int64_t)p;
                buf[1].i64 = (int64_t)n;
                err = p_call(ctx, dealloc, buf, 2, &trap);
            }
            if (err || trap) {
                code = RT_WASM_ERROR;
                break;
            }
        }
        if (fuel >= 0) {
            void *ferr = p_get_fuel(ctx, &fuel_left);
            if (ferr != NULL) {
                /* Cannot happen on a fuel engine; report the error rather than a made-up number. */
                err = ferr;
                code = RT_WASM_ERROR;
                break;
            }
        }
        size = p_mem_size(ctx, mem);
    } while (0);
    Py_END_ALLOW_THREADS

    PyObject *out = NULL;
    if (heap_failed)
        return PyErr_NoMemory();
    if (code == RT_WASM_ERROR) {
        a = (unsigned long long)(uintptr_t)err;
        b = (unsigned long long)(uintptr_t)trap;
    } else if (code == RT_OK) {
        out = PyBytes_FromStringAndSize(copy, (Py_ssize_t)rl);
        a = fuel_left;
        b = size;
    }
    if (copy != stack)
        free(copy);
    if (code == RT_OK && out == NULL)
        return NULL;
    return result(code, out, a, b, c);
}

static PyMethodDef methods[] = {
    {"bind", native_bind, METH_VARARGS, "bind(call, data, size, set_fuel, get_fuel, set_deadline): C-API addresses"},
    {"round_trip", native_round_trip, METH_VARARGS,
     "round_trip(ctx, mem, alloc, func, dealloc, payload, max_output, fuel, ticks) -> (code, reply, a, b, c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "host.sandbox._native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
