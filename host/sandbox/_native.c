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
        PyErr_SetString(PyExc_RuntimeError, "sandbus.host.sandbox._native.bind() was not called");
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

/* ---------------------------------------------------------------------------------------------
 * OTLP encoding of a request's two spans (host/telemetry/export.py): the common case only (no audit
 * events, no error); anything else returns None and the Python encoder does it. The byte layout is
 * exactly otlp_wire.encode_span's (tests/telemetry/test_fast_spans.py compares the two).
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *p, *end;
    int overflow;
} out_t;

static void put(out_t *o, const void *data, size_t n) {
    if (o->overflow || (size_t)(o->end - o->p) < n) {
        o->overflow = 1;
        return;
    }
    memcpy(o->p, data, n);
    o->p += n;
}

static void put_byte(out_t *o, uint8_t b) { put(o, &b, 1); }

static void put_varint(out_t *o, uint64_t v) {
    uint8_t buf[10];
    size_t n = 0;
    while (v >= 0x80) {
        buf[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    buf[n++] = (uint8_t)v;
    put(o, buf, n);
}

static void put_fixed64(out_t *o, uint64_t v) {
    uint8_t buf[8];
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(v >> (8 * i));
    put(o, buf, 8);
}

static void put_be64(out_t *o, uint64_t v) {
    uint8_t buf[8];
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(v >> (56 - 8 * i));
    put(o, buf, 8);
}

static size_t varint_len(uint64_t v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static void put_flags(out_t *o, uint32_t flags) {
    uint8_t buf[6] = {0x85, 0x01, (uint8_t)flags, (uint8_t)(flags >> 8), (uint8_t)(flags >> 16),
                      (uint8_t)(flags >> 24)};
    put(o, buf, 6);
}

/* A Span.attributes entry (field 9): the key and an already encoded AnyValue. */
static void put_attr(out_t *o, const char *key, const uint8_t *value, size_t value_len) {
    size_t klen = strlen(key);
    put_byte(o, 0x4a);
    put_varint(o, 1 + varint_len(klen) + klen + 1 + varint_len(value_len) + value_len);
    put_byte(o, 0x0a);
    put_varint(o, klen);
    put(o, key, klen);
    put_byte(o, 0x12);
    put_varint(o, value_len);
    put(o, value, value_len);
}

static void put_int_attr(out_t *o, const char *key, uint64_t v) {
    uint8_t buf[11];
    out_t av = {buf, buf + sizeof buf, 0};
    put_byte(&av, 0x18); /* AnyValue.int_value */
    put_varint(&av, v);
    put_attr(o, key, buf, (size_t)(av.p - buf));
}

static void put_double_attr(out_t *o, const char *key, double v) {
    uint8_t buf[9];
    out_t av = {buf, buf + sizeof buf, 0};
    uint64_t bits;
    memcpy(&bits, &v, 8);
    put_byte(&av, 0x21); /* AnyValue.double_value */
    put_fixed64(&av, bits);
    put_attr(o, key, buf, sizeof buf);
}

/* s is at most 512 bytes (the caller checks): the AnyValue fits the buffer. */
static void put_str_attr(out_t *o, const char *key, const char *s, size_t slen) {
    uint8_t buf[3 + 512];
    out_t av = {buf, buf + sizeof buf, 0};
    put_byte(&av, 0x0a); /* AnyValue.string_value */
    put_varint(&av, slen);
    put(&av, s, slen);
    if (av.overflow) {
        o->overflow = 1;
        return;
    }
    put_attr(o, key, buf, (size_t)(av.p - buf));
}

static int hex_to_bytes(PyObject *str, uint8_t *out, size_t n) {
    Py_ssize_t len;
    const char *s = PyUnicode_Check(str) ? PyUnicode_AsUTF8AndSize(str, &len) : NULL;
    if (s == NULL || (size_t)len != 2 * n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        int v = 0;
        for (int k = 0; k < 2; k++) {
            char c = s[2 * i + k];
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
            if (d < 0)
                return -1;
            v = v * 16 + d;
        }
        out[i] = (uint8_t)v;
    }
    return 0;
}

static int get_u64(PyObject *list, Py_ssize_t i, uint64_t *out) {
    PyObject *v = PyList_GET_ITEM(list, i);
    if (!PyLong_Check(v))
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = x;
    return 0;
}

/* encode_request(record, process_const, exec_const, duration_ms) -> bytes | None */
static PyObject *native_encode_request(PyObject *self, PyObject *args) {
    PyObject *r;
    const char *pconst, *econst;
    Py_ssize_t pconst_len, econst_len;
    double duration_ms;
    if (!PyArg_ParseTuple(args, "O!y#y#d", &PyList_Type, &r, &pconst, &pconst_len, &econst, &econst_len,
                          &duration_ms))
        return NULL;
    if (PyList_GET_SIZE(r) != 19)
        Py_RETURN_NONE;
    PyObject *parent = PyList_GET_ITEM(r, 1), *state = PyList_GET_ITEM(r, 2), *msg_id = PyList_GET_ITEM(r, 9);
    PyObject *result = PyList_GET_ITEM(r, 16), *error = PyList_GET_ITEM(r, 17), *events = PyList_GET_ITEM(r, 18);
    if (error != Py_None || events != Py_None || state != Py_None || !PyList_Check(result) ||
        PyList_GET_SIZE(result) != 3)
        Py_RETURN_NONE; /* the uncommon shapes: the Python encoder */
    uint8_t trace[16], parent_id[8];
    uint64_t pid, eid, start, end, body_size, exec_start, exec_end, fuel, memory;
    if (hex_to_bytes(PyList_GET_ITEM(r, 0), trace, 16) || (parent != Py_None && hex_to_bytes(parent, parent_id, 8)) ||
        get_u64(r, 3, &pid) || get_u64(r, 4, &eid) || get_u64(r, 5, &start) || get_u64(r, 6, &end) ||
        get_u64(r, 10, &body_size) || get_u64(r, 14, &exec_start) || get_u64(r, 15, &exec_end) ||
        get_u64(result, 0, &fuel) || get_u64(result, 1, &memory))
        Py_RETURN_NONE;
    const char *mid = NULL;
    Py_ssize_t mid_len = 0;
    if (msg_id != Py_None) {
        if (!PyUnicode_Check(msg_id) || (mid = PyUnicode_AsUTF8AndSize(msg_id, &mid_len)) == NULL) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
    }
    if (pconst_len > 2048 || econst_len > 2048 || mid_len > 512)
        Py_RETURN_NONE;
    uint8_t span[3072], outbuf[6400];
    out_t o = {outbuf, outbuf + sizeof outbuf, 0};
    for (int which = 0; which < 2; which++) {
        out_t s = {span, span + sizeof span, 0};
        put(&s, "\x0a\x10", 2);
        put(&s, trace, 16);
        put(&s, "\x12\x08", 2);
        put_be64(&s, which == 0 ? pid : eid);
        /* The field order of host/telemetry/otlp_wire.py's encode_span. */
        if (which == 0) {
            if (parent != Py_None) {
                put(&s, "\x22\x08", 2);
                put(&s, parent_id, 8);
            }
            put_byte(&s, 0x39);
            put_fixed64(&s, start);
            put_byte(&s, 0x41);
            put_fixed64(&s, end);
            put(&s, pconst, (size_t)pconst_len);
            put_int_attr(&s, "messaging.message.body.size", body_size);
            if (mid != NULL && mid_len > 0)
                put_str_attr(&s, "messaging.message.id", mid, (size_t)mid_len);
            put_flags(&s, parent != Py_None ? 0x300 : 0x100);
        } else {
            put(&s, "\x22\x08", 2);
            put_be64(&s, pid);
            put_byte(&s, 0x39);
            put_fixed64(&s, exec_start);
            put_byte(&s, 0x41);
            put_fixed64(&s, exec_end);
            put(&s, econst, (size_t)econst_len);
            put_int_attr(&s, "sandbus.fuel_consumed", fuel);
            put_int_attr(&s, "sandbus.memory_bytes", memory);
            put_double_attr(&s, "sandbus.duration_ms", duration_ms);
            put_str_attr(&s, "sandbus.outcome", "ok", 2);
            put_flags(&s, 0x100);
        }
        if (s.overflow)
            Py_RETURN_NONE;
        size_t n = (size_t)(s.p - span);
        put_byte(&o, 0x12);
        put_varint(&o, n);
        put(&o, span, n);
    }
    if (o.overflow)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)outbuf, o.p - outbuf);
}

static PyMethodDef methods[] = {
    {"encode_request", native_encode_request, METH_VARARGS,
     "encode_request(record, process_const, exec_const, duration_ms) -> bytes | None"},
    {"bind", native_bind, METH_VARARGS, "bind(call, data, size, set_fuel, get_fuel, set_deadline): C-API addresses"},
    {"round_trip", native_round_trip, METH_VARARGS,
     "round_trip(ctx, mem, alloc, func, dealloc, payload, max_output, fuel, ticks) -> (code, reply, a, b, c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sandbus.host.sandbox._native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
