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
 * fresh_call does the same round trip on a fresh instance that it builds from an InstancePre and
 * discards after the call (isolation = "per-call", host/sandbox/percall.py), with the same checks.
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

/* What one ABI round trip left: the code, its details, and on success the reply (in `copy`, which is
 * `stack` unless the reply was larger), the fuel left and the memory size. */
typedef struct {
    int code;
    int heap_failed;
    void *err, *trap;
    unsigned long long a, b, c;
    uint64_t rl, fuel_left;
    size_t size;
    char *copy;
} rt_out;

/* The round trip proper (alloc, write, call, read, dealloc), without the GIL. `set_deadline`: 0 keeps
 * the deadline already set (a fresh instance's one deadline covers its setup and its call). */
static void core_round_trip(void *ctx, void *mem, const void *alloc, const void *func, const void *dealloc,
                            const char *payload, Py_ssize_t n, unsigned long long max_output, long long fuel,
                            int set_deadline, unsigned long long ticks, char *stack, rt_out *o) {
    val_raw_t buf[2];
    uint64_t p = 0, rp = 0, rl = 0;
    size_t size = 0;
    do {
        if (fuel >= 0 && (o->err = p_set_fuel(ctx, (uint64_t)fuel)) != NULL) {
            o->code = RT_WASM_ERROR;
            break;
        }
        if (set_deadline)
            p_set_deadline(ctx, ticks);
        buf[0].i64 = (int64_t)n;
        o->err = p_call(ctx, alloc, buf, 1, &o->trap);
        if (o->err || o->trap) {
            o->code = RT_WASM_ERROR;
            break;
        }
        p = (uint32_t)buf[0].i32;
        if (p == 0 && n) {
            o->code = RT_ALLOC_FAILED;
            o->a = (unsigned long long)n;
            break;
        }
        size = p_mem_size(ctx, mem);
        if (p + (uint64_t)n > size) {
            o->code = RT_BAD_INPUT_RANGE;
            o->a = p, o->b = (unsigned long long)n, o->c = size;
            break;
        }
        if (n)
            memcpy(p_mem_data(ctx, mem) + p, payload, (size_t)n);
        buf[0].i64 = (int64_t)p;
        buf[1].i64 = (int64_t)n;
        o->err = p_call(ctx, func, buf, 2, &o->trap);
        if (o->err || o->trap) {
            o->code = RT_WASM_ERROR;
            break;
        }
        uint64_t packed = (uint64_t)buf[0].i64;
        rp = packed >> 32;
        rl = packed & 0xFFFFFFFFu;
        if (rl > max_output) {
            o->code = RT_REPLY_TOO_LARGE;
            o->a = rl;
            break;
        }
        size = p_mem_size(ctx, mem);
        if (rp + rl > size) {
            o->code = RT_BAD_REPLY_RANGE;
            o->a = rp, o->b = rl, o->c = size;
            break;
        }
        if (rl > STACK_REPLY) {
            o->copy = malloc((size_t)rl);
            if (o->copy == NULL) {
                o->heap_failed = 1;
                o->copy = stack;
                break;
            }
        }
        /* Copied out before dealloc: the guest may reuse the bytes as soon as they are freed. */
        memcpy(o->copy, p_mem_data(ctx, mem) + rp, (size_t)rl);
        o->rl = rl;
        if (dealloc) {
            buf[0].i64 = (int64_t)rp;
            buf[1].i64 = (int64_t)rl;
            o->err = p_call(ctx, dealloc, buf, 2, &o->trap);
            if (!o->err && !o->trap && p) {
                buf[0].i64 = (int64_t)p;
                buf[1].i64 = (int64_t)n;
                o->err = p_call(ctx, dealloc, buf, 2, &o->trap);
            }
            if (o->err || o->trap) {
                o->code = RT_WASM_ERROR;
                break;
            }
        }
        if (fuel >= 0) {
            void *ferr = p_get_fuel(ctx, &o->fuel_left);
            if (ferr != NULL) {
                /* Cannot happen on a fuel engine; report the error rather than a made-up number. */
                o->err = ferr;
                o->code = RT_WASM_ERROR;
                break;
            }
        }
        o->size = p_mem_size(ctx, mem);
    } while (0);
}

/* The Python result of a round trip; frees a heap copy. */
static PyObject *rt_result(rt_out *o, char *stack) {
    PyObject *out = NULL;
    unsigned long long a = o->a, b = o->b, c = o->c;
    if (o->heap_failed) {
        if (o->copy != stack)
            free(o->copy);
        return PyErr_NoMemory();
    }
    if (o->code == RT_WASM_ERROR) {
        a = (unsigned long long)(uintptr_t)o->err;
        b = (unsigned long long)(uintptr_t)o->trap;
    } else if (o->code == RT_OK) {
        out = PyBytes_FromStringAndSize(o->copy, (Py_ssize_t)o->rl);
        a = o->fuel_left;
        b = o->size;
    }
    if (o->copy != stack)
        free(o->copy);
    if (o->code == RT_OK && out == NULL)
        return NULL;
    return result(o->code, out, a, b, c);
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
    char stack[STACK_REPLY];
    rt_out o = {0};
    o.copy = stack;
    Py_BEGIN_ALLOW_THREADS
    core_round_trip((void *)(uintptr_t)ctx_a, (void *)(uintptr_t)mem_a, (const void *)(uintptr_t)alloc_a,
                    (const void *)(uintptr_t)func_a, (const void *)(uintptr_t)dealloc_a, payload, n, max_output,
                    fuel, 1, ticks, stack, &o);
    Py_END_ALLOW_THREADS
    return rt_result(&o, stack);
}

/* ---------------------------------------------------------------------------------------------
 * A fresh instance for one call (isolation = "per-call"): new store, instantiate from an InstancePre
 * (the engine's pooling allocator hands out a slot with a copy-on-write memory image), _initialize and
 * sandbus_init(config) when exported, the round trip above, then the store is deleted and nothing of
 * the instance survives. One deadline covers all of it; fuel is set for the setup and again for the
 * call, as a pooled instance's init and calls each get their own.
 * ------------------------------------------------------------------------------------------- */

typedef void *(*store_new_fn)(void *engine, void *data, void (*finalizer)(void *));
typedef void *(*store_context_fn)(void *store);
typedef void (*store_limiter_fn)(void *store, int64_t memory, int64_t table_elements, int64_t instances,
                                 int64_t tables, int64_t memories);
typedef void (*store_delete_fn)(void *store);
typedef void *(*pre_instantiate_fn)(const void *pre, void *ctx, void *instance, void **trap);
typedef int (*export_get_fn)(void *ctx, const void *instance, const char *name, size_t len, void *item);

static store_new_fn p_store_new;
static store_context_fn p_store_context;
static store_limiter_fn p_store_limiter;
static store_delete_fn p_store_delete;
static pre_instantiate_fn p_pre_instantiate;
static export_get_fn p_export_get;
static void (*p_error_delete)(void *error);

/* A wasmtime_extern_t: kind, then the item at offset 8 (host/sandbox/percall.py checks both against
 * wasmtime-py's declaration before binding; the struct is 32 bytes in wasmtime 50). */
#define EXTERN_BYTES 64
#define EXTERN_OF 8
#define EXTERN_FUNC 0
#define EXTERN_MEMORY 3
typedef union {
    uint64_t align;
    uint8_t bytes[EXTERN_BYTES];
} extern_buf;

enum {
    FRESH_INSTANTIATE = 6, /* a = error, b = trap: instantiation failed (pool full, memory limit, start trapped) */
    FRESH_INIT_FAILED = 7, /* a = sandbus_init's non-zero status */
    FRESH_NO_EXPORT = 8,   /* an export checked at load is missing (cannot happen for an InstancePre of it) */
};
/* Where an RT_WASM_ERROR happened (in c). */
enum { STAGE_CALL = 0, STAGE_INITIALIZE = 1, STAGE_INIT = 2 };
/* Flags: which optional exports to use. */
enum { HAS_DEALLOC = 1, HAS_INITIALIZE = 2, HAS_INIT = 4 };

/* The scratch block a per-call slot owns (u64 words): [0] the live store's context (0 between calls:
 * a host function then finds no instance), [1..8] the memory extern, [9] memory size and [10] fuel left
 * when the instance was discarded, whatever ended the call; then the slot's constants, written once by
 * host/sandbox/percall.py. */
#define SCRATCH_MEMORY_AT_END 9
#define SCRATCH_FUEL_AT_END 10
#define SCRATCH_ENGINE 11
#define SCRATCH_PRE 12
#define SCRATCH_MEMORY_LIMIT 13
#define SCRATCH_TABLE_LIMIT 14
#define SCRATCH_FLAGS 15
#define SCRATCH_MAX_OUTPUT 16
#define SCRATCH_FUEL 17 /* as int64: -1 without metering */

static PyObject *native_bind_fresh(PyObject *self, PyObject *args) {
    unsigned long long a[7];
    if (!PyArg_ParseTuple(args, "KKKKKKK", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6]))
        return NULL;
    for (int i = 0; i < 7; i++)
        if (!a[i]) {
            PyErr_SetString(PyExc_ValueError, "a wasmtime function address is 0");
            return NULL;
        }
    p_store_new = (store_new_fn)(uintptr_t)a[0];
    p_store_context = (store_context_fn)(uintptr_t)a[1];
    p_store_limiter = (store_limiter_fn)(uintptr_t)a[2];
    p_store_delete = (store_delete_fn)(uintptr_t)a[3];
    p_pre_instantiate = (pre_instantiate_fn)(uintptr_t)a[4];
    p_export_get = (export_get_fn)(uintptr_t)a[5];
    p_error_delete = (void (*)(void *))(uintptr_t)a[6];
    Py_RETURN_NONE;
}

static int get_export(void *ctx, const void *inst, const char *name, size_t len, int kind, extern_buf *out) {
    return p_export_get(ctx, inst, name, len, out->bytes) && out->bytes[0] == kind;
}

/* fresh_call(scratch, function, config, payload, ticks) -> (code, reply | None, a, b, c) as round_trip,
 * plus the codes above. The slot's constants are in its scratch block (SCRATCH_* below): one parse of
 * five arguments instead of twelve, on every call. */
static PyObject *native_fresh_call(PyObject *self, PyObject *args) {
    unsigned long long scratch_a, ticks;
    const char *fname, *config, *payload;
    Py_ssize_t fname_n, config_n, n;
    if (!PyArg_ParseTuple(args, "Ky#y#y#K", &scratch_a, &fname, &fname_n, &config, &config_n, &payload, &n, &ticks))
        return NULL;
    if (p_call == NULL || p_store_new == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sandbus.host.sandbox._native.bind_fresh() was not called");
        return NULL;
    }
    uint64_t *scratch = (uint64_t *)(uintptr_t)scratch_a;
    uint64_t engine_a = scratch[SCRATCH_ENGINE], pre_a = scratch[SCRATCH_PRE];
    int64_t memory_bytes = (int64_t)scratch[SCRATCH_MEMORY_LIMIT], table_elements = (int64_t)scratch[SCRATCH_TABLE_LIMIT];
    int flags = (int)scratch[SCRATCH_FLAGS];
    unsigned long long max_output = scratch[SCRATCH_MAX_OUTPUT];
    long long fuel = (long long)(int64_t)scratch[SCRATCH_FUEL];
    if (!engine_a || !pre_a) {
        PyErr_SetString(PyExc_ValueError, "the scratch block names no engine or InstancePre");
        return NULL;
    }
    void *mem = (void *)(scratch + 1 + EXTERN_OF / 8);
    char stack[STACK_REPLY];
    rt_out o = {0};
    o.copy = stack;
    int store_failed = 0;

    Py_BEGIN_ALLOW_THREADS
    void *store = p_store_new((void *)(uintptr_t)engine_a, NULL, NULL);
    if (store == NULL) {
        store_failed = 1;
    } else {
        void *ctx = p_store_context(store);
        struct { uint64_t store_id; size_t priv; } inst;
        extern_buf alloc, func, dealloc, xinit;
        val_raw_t buf[2];
        p_store_limiter(store, memory_bytes, table_elements, 1, 4, 1);
        do {
            if (fuel >= 0 && (o.err = p_set_fuel(ctx, (uint64_t)fuel)) != NULL) {
                o.code = RT_WASM_ERROR;
                break;
            }
            p_set_deadline(ctx, ticks);
            o.err = p_pre_instantiate((const void *)(uintptr_t)pre_a, ctx, &inst, &o.trap);
            if (o.err || o.trap) {
                o.code = FRESH_INSTANTIATE;
                break;
            }
            if (!p_export_get(ctx, &inst, "memory", 6, (uint8_t *)(scratch + 1)) ||
                ((uint8_t *)(scratch + 1))[0] != EXTERN_MEMORY ||
                !get_export(ctx, &inst, "sandbus_alloc", 13, EXTERN_FUNC, &alloc) ||
                !get_export(ctx, &inst, fname, (size_t)fname_n, EXTERN_FUNC, &func) ||
                ((flags & HAS_DEALLOC) && !get_export(ctx, &inst, "sandbus_dealloc", 15, EXTERN_FUNC, &dealloc))) {
                o.code = FRESH_NO_EXPORT;
                break;
            }
            scratch[0] = (uint64_t)(uintptr_t)ctx; /* host functions may reach the memory from here on */
            const void *alloc_f = alloc.bytes + EXTERN_OF;
            const void *dealloc_f = (flags & HAS_DEALLOC) ? (const void *)(dealloc.bytes + EXTERN_OF) : NULL;
            if (flags & HAS_INITIALIZE) {
                if (!get_export(ctx, &inst, "_initialize", 11, EXTERN_FUNC, &xinit)) {
                    o.code = FRESH_NO_EXPORT;
                    break;
                }
                o.err = p_call(ctx, xinit.bytes + EXTERN_OF, buf, 0, &o.trap);
                if (o.err || o.trap) {
                    o.code = RT_WASM_ERROR;
                    o.c = STAGE_INITIALIZE;
                    break;
                }
            }
            if (flags & HAS_INIT) {
                if (!get_export(ctx, &inst, "sandbus_init", 12, EXTERN_FUNC, &xinit)) {
                    o.code = FRESH_NO_EXPORT;
                    break;
                }
                buf[0].i64 = (int64_t)config_n;
                o.err = p_call(ctx, alloc_f, buf, 1, &o.trap);
                if (o.err || o.trap) {
                    o.code = RT_WASM_ERROR;
                    o.c = STAGE_INIT;
                    break;
                }
                uint64_t p = (uint32_t)buf[0].i32;
                if (p == 0 && config_n) {
                    o.code = RT_ALLOC_FAILED;
                    o.a = (unsigned long long)config_n;
                    o.c = STAGE_INIT;
                    break;
                }
                size_t size = p_mem_size(ctx, mem);
                if (p + (uint64_t)config_n > size) {
                    o.code = RT_BAD_INPUT_RANGE;
                    o.a = p, o.b = (unsigned long long)config_n, o.c = size;
                    break;
                }
                if (config_n)
                    memcpy(p_mem_data(ctx, mem) + p, config, (size_t)config_n);
                buf[0].i64 = (int64_t)p;
                buf[1].i64 = (int64_t)config_n;
                o.err = p_call(ctx, xinit.bytes + EXTERN_OF, buf, 2, &o.trap);
                if (o.err || o.trap) {
                    o.code = RT_WASM_ERROR;
                    o.c = STAGE_INIT;
                    break;
                }
                int32_t status = buf[0].i32;
                if (dealloc_f && p) {
                    buf[0].i64 = (int64_t)p;
                    buf[1].i64 = (int64_t)config_n;
                    o.err = p_call(ctx, dealloc_f, buf, 2, &o.trap);
                    if (o.err || o.trap) {
                        o.code = RT_WASM_ERROR;
                        o.c = STAGE_INIT;
                        break;
                    }
                }
                if (status != 0) {
                    o.code = FRESH_INIT_FAILED;
                    o.a = (unsigned long long)(uint32_t)status;
                    break;
                }
            }
            core_round_trip(ctx, mem, alloc_f, func.bytes + EXTERN_OF, dealloc_f, payload, n, max_output, fuel, 0,
                            ticks, stack, &o);
        } while (0);
        if (o.code == FRESH_INSTANTIATE) {
            o.a = (unsigned long long)(uintptr_t)o.err;
            o.b = (unsigned long long)(uintptr_t)o.trap;
        }
        /* What the caller reports whatever ended the call: read before the store goes. */
        scratch[SCRATCH_MEMORY_AT_END] = scratch[0] ? p_mem_size(ctx, mem) : 0;
        uint64_t left = 0;
        if (fuel >= 0) {
            void *ferr = p_get_fuel(ctx, &left);
            if (ferr != NULL) {
                /* Cannot happen on a fuel engine: report the call's own error, and none for this reading. */
                left = (uint64_t)fuel;
                p_error_delete(ferr);
            }
        }
        scratch[SCRATCH_FUEL_AT_END] = left;
        scratch[0] = 0; /* before the store goes: no host function may reach it afterwards */
        p_store_delete(store);
    }
    Py_END_ALLOW_THREADS
    if (store_failed)
        return PyErr_NoMemory();
    return rt_result(&o, stack);
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

/* ---------------------------------------------------------------------------------------------
 * An Extism plugin's round trip (host/sandbox/extism/invoker.py): our kernel's sandbus_begin (free
 * everything, cap the kernel memory for this call, allocate the input block), the input copied in, the
 * plugin's () -> i32 export, then sandbus_output (offset << 32 | length, all ones when freed) or, on a
 * non-zero return, sandbus_error. The same checks as above: every span against a fresh memory size.
 */
enum {
    RT_GUEST_ERROR = 6,  /* a = return code (as u32), b = sandbus_error's packed block */
    RT_OUTPUT_FREED = 7,
};

/* extism_round_trip(ctx, kmem, pmem, begin, func, output, error, payload, max_output, fuel, ticks, memory_limit)
 *   -> (code, reply | None, a, b, c); on success a = fuel left, b = both memories' size. pmem may be 0. */
static PyObject *native_extism_round_trip(PyObject *self, PyObject *args) {
    unsigned long long ctx_a, kmem_a, pmem_a, begin_a, func_a, output_a, error_a, max_output, ticks, limit;
    long long fuel;
    const char *payload;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKKKKKKy#KLKK", &ctx_a, &kmem_a, &pmem_a, &begin_a, &func_a, &output_a, &error_a,
                          &payload, &n, &max_output, &fuel, &ticks, &limit))
        return NULL;
    if (p_call == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sandbus.host.sandbox._native.bind() was not called");
        return NULL;
    }
    void *ctx = (void *)(uintptr_t)ctx_a, *kmem = (void *)(uintptr_t)kmem_a, *pmem = (void *)(uintptr_t)pmem_a;
    char stack[STACK_REPLY];
    rt_out o = {0};
    o.copy = stack;
    Py_BEGIN_ALLOW_THREADS
    do {
        val_raw_t buf[2];
        if (fuel >= 0 && (o.err = p_set_fuel(ctx, (uint64_t)fuel)) != NULL) {
            o.code = RT_WASM_ERROR;
            break;
        }
        p_set_deadline(ctx, ticks);
        uint64_t psize = pmem ? p_mem_size(ctx, pmem) : 0;
        buf[0].i64 = (int64_t)n;
        buf[1].i64 = (int64_t)(limit > psize ? limit - psize : 0);
        o.err = p_call(ctx, (const void *)(uintptr_t)begin_a, buf, 2, &o.trap);
        if (o.err || o.trap) {
            o.code = RT_WASM_ERROR;
            break;
        }
        uint64_t p = (uint64_t)buf[0].i64;
        size_t size = p_mem_size(ctx, kmem);
        if (p > size || (uint64_t)n > size - p) {
            o.code = RT_BAD_INPUT_RANGE;
            o.a = p, o.b = (unsigned long long)n, o.c = size;
            break;
        }
        if (n)
            memcpy(p_mem_data(ctx, kmem) + p, payload, (size_t)n);
        o.err = p_call(ctx, (const void *)(uintptr_t)func_a, buf, 1, &o.trap);
        if (o.err || o.trap) {
            o.code = RT_WASM_ERROR;
            break;
        }
        int32_t rc = buf[0].i32;
        if (rc != 0) {
            o.err = p_call(ctx, (const void *)(uintptr_t)error_a, buf, 1, &o.trap);
            if (o.err || o.trap) {
                o.code = RT_WASM_ERROR;
                break;
            }
            o.code = RT_GUEST_ERROR;
            o.a = (uint32_t)rc, o.b = (uint64_t)buf[0].i64;
            break;
        }
        o.err = p_call(ctx, (const void *)(uintptr_t)output_a, buf, 1, &o.trap);
        if (o.err || o.trap) {
            o.code = RT_WASM_ERROR;
            break;
        }
        uint64_t packed = (uint64_t)buf[0].i64;
        if (packed == UINT64_MAX) {
            o.code = RT_OUTPUT_FREED;
            break;
        }
        uint64_t rp = packed >> 32, rl = packed & 0xFFFFFFFFu;
        if (rl > max_output) {
            o.code = RT_REPLY_TOO_LARGE;
            o.a = rl;
            break;
        }
        size = p_mem_size(ctx, kmem);
        if (rp + rl > size) {
            o.code = RT_BAD_REPLY_RANGE;
            o.a = rp, o.b = rl, o.c = size;
            break;
        }
        if (rl > STACK_REPLY) {
            o.copy = malloc((size_t)rl);
            if (o.copy == NULL) {
                o.heap_failed = 1;
                o.copy = stack;
                break;
            }
        }
        memcpy(o.copy, p_mem_data(ctx, kmem) + rp, (size_t)rl);
        o.rl = rl;
        if (fuel >= 0) {
            void *ferr = p_get_fuel(ctx, &o.fuel_left);
            if (ferr != NULL) {
                o.err = ferr;
                o.code = RT_WASM_ERROR;
                break;
            }
        }
        o.size = size + (pmem ? p_mem_size(ctx, pmem) : 0);
    } while (0);
    Py_END_ALLOW_THREADS
    return rt_result(&o, stack);
}

static PyMethodDef methods[] = {
    {"encode_request", native_encode_request, METH_VARARGS,
     "encode_request(record, process_const, exec_const, duration_ms) -> bytes | None"},
    {"bind", native_bind, METH_VARARGS, "bind(call, data, size, set_fuel, get_fuel, set_deadline): C-API addresses"},
    {"bind_fresh", native_bind_fresh, METH_VARARGS,
     "bind_fresh(store_new, store_context, store_limiter, store_delete, pre_instantiate, export_get, "
     "error_delete)"},
    {"fresh_call", native_fresh_call, METH_VARARGS,
     "fresh_call(scratch, function, config, payload, ticks) -> (code, reply, a, b, c)"},
    {"extism_round_trip", native_extism_round_trip, METH_VARARGS,
     "extism_round_trip(ctx, kmem, pmem, begin, func, output, error, payload, max_output, fuel, ticks, "
     "memory_limit) -> (code, reply, a, b, c)"},
    {"round_trip", native_round_trip, METH_VARARGS,
     "round_trip(ctx, mem, alloc, func, dealloc, payload, max_output, fuel, ticks) -> (code, reply, a, b, c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sandbus.host.sandbox._native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
