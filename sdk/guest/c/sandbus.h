/*
 * sandbus.h - single-header C SDK for sandbus guest plugins (Guest ABI v1).
 *
 * Build a plugin (one .c file that includes this header) with:
 *
 *   clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor \
 *         -Wl,--strip-all -I sdk/guest/c -o plugin.wasm plugin.c
 *
 * (Debian/Ubuntu packages: clang lld wasi-libc libclang-rt-14-dev-wasm32.)
 *
 * What the header gives you:
 *
 *   - The required ABI exports: sandbus_abi_version, sandbus_alloc and
 *     sandbus_dealloc (malloc/free based). They are real (non-inline)
 *     definitions, so exactly ONE translation unit of a plugin may include
 *     this header without SANDBUS_NO_EXPORTS. A plugin made of several .c
 *     files defines SANDBUS_NO_EXPORTS before including sandbus.h in all
 *     of them but one.
 *   - SANDBUS_EXPORT(name): marks a function as a wasm export named `name`.
 *     A callable function has the C signature
 *         uint64_t fn(const uint8_t *in, uint32_t len)
 *     i.e. wasm (i32, i32) -> i64.
 *   - Host imports (module "sandbus_v1"): log, time_now_ms, env_get, publish,
 *     request, kv_*, http_request, take_result, and the helpers sandbus_log,
 *     sandbus_log_n, sandbus_time_ms, sandbus_getenv, sandbus_publish,
 *     sandbus_request.
 *   - Replies: sandbus_reply (copy into a fresh buffer and pack) and
 *     sandbus_pack.
 *   - A tiny JSON writer (sandbus_buf_*) that can hand its buffer over as the
 *     reply without a copy.
 *   - A tiny validating JSON reader: sandbus_json_get finds a top-level member
 *     of an object and gives the raw text of its value; sandbus_json_string
 *     decodes a string value. Nothing ever reads outside [json, json+len).
 *
 * Everything except the three ABI exports is `static inline`; an unused
 * helper costs nothing and, in particular, an unused host import does not
 * appear in the module's import section.
 *
 * Memory ownership (see docs/abi.md): the host allocates the request buffer
 * with sandbus_alloc and frees it itself after the call; the guest must not
 * free it. The reply must be a fresh block that sandbus_dealloc can free
 * (malloc'd); the host frees it after reading it.
 *
 * C99, clean under -Wall -Wextra (-pedantic too).
 */
#ifndef SANDBUS_H
#define SANDBUS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The Guest ABI version this header implements. */
#define SANDBUS_ABI_VERSION 1

/* Mark a function as a wasm export called `name` (keeps it under
 * --strip-all / --gc-sections). Usage:
 *
 *   SANDBUS_EXPORT(handle_request)
 *   uint64_t handle_request(const uint8_t *in, uint32_t len) { ... }
 *
 * SANDBUS_IMPORT(name): declare a host function imported from module
 * "sandbus_v1" under `name`.
 *
 * Off wasm (e.g. compiling the header natively to unit-test plugin logic or
 * fuzz the JSON reader with sanitizers) both macros expand to nothing; the
 * test then defines sandbus_host_log & co. itself. sandbus_pack is only
 * meaningful on wasm32. */
#if defined(__wasm__)
#define SANDBUS_EXPORT(name) __attribute__((export_name(#name)))
#define SANDBUS_IMPORT(name) __attribute__((import_module("sandbus_v1"), import_name(#name)))
#else
#define SANDBUS_EXPORT(name)
#define SANDBUS_IMPORT(name)
#endif

/* Log levels for sandbus_log / sandbus_log_n. */
enum {
    SANDBUS_LOG_TRACE = 0,
    SANDBUS_LOG_DEBUG = 1,
    SANDBUS_LOG_INFO = 2,
    SANDBUS_LOG_WARN = 3,
    SANDBUS_LOG_ERROR = 4
};

/* ------------------------------------------------------------------------ */
/* Host imports (raw). Prefer the sandbus_* helpers below.                   */
/* ------------------------------------------------------------------------ */

/* log(level, ptr, len): write one log line (UTF-8) at `level`. */
SANDBUS_IMPORT(log)
void sandbus_host_log(int32_t level, const void *ptr, uint32_t len);

/* time_now_ms(): unix time in milliseconds. Needs the clock capability:
 * without it the call fails (the host stops the call with an error). */
SANDBUS_IMPORT(time_now_ms)
int64_t sandbus_host_time_now_ms(void);

/* env_get(name_ptr, name_len, buf_ptr, buf_cap): byte length of the value of
 * environment variable `name` (only variables the operator granted exist),
 * writing min(length, cap) bytes to buf; -1 if unset. */
SANDBUS_IMPORT(env_get)
int32_t sandbus_host_env_get(const void *name, uint32_t name_len, void *buf, uint32_t buf_cap);

/* publish(topic_ptr, topic_len, json_ptr, json_len): publish the JSON payload
 * onto `topic` (e.g. "orders.created") as a PluginMessage from this plugin.
 * Returns 0. Needs the messaging capability and a manifest
 * [permissions] publish_topics entry matching the topic, which the node's
 * operator policy ([messaging] publish_topics) must also allow (a plugin asking
 * for more does not load): otherwise the host stops the call with a security
 * violation. A chain of more than 8 (the node's limit) plugin-to-plugin
 * requests and publishes stops the call too. Only linked when used. */
SANDBUS_IMPORT(publish)
int32_t sandbus_host_publish(const void *topic, uint32_t topic_len, const void *json, uint32_t json_len);

/* kv_get(key, key_len, buf, cap): this plugin's key-value store (needs the storage
 * capability). Returns the value's full length (writing min(len, cap) bytes) or
 * -1 if the key is absent. If the length exceeds cap, take_result() fetches it again. */
SANDBUS_IMPORT(kv_get)
int32_t sandbus_host_kv_get(const void *key, uint32_t key_len, void *buf, uint32_t cap);

/* kv_put(key, key_len, value, value_len): store a value (64 KiB max; the store has a quota). 0 on success. */
SANDBUS_IMPORT(kv_put)
int32_t sandbus_host_kv_put(const void *key, uint32_t key_len, const void *value, uint32_t value_len);

/* kv_delete(key, key_len): remove a key. 0 on success. */
SANDBUS_IMPORT(kv_delete)
int32_t sandbus_host_kv_delete(const void *key, uint32_t key_len);

/* http_request(req_json, len, buf, cap): an HTTP request described as
 * {"method":"GET","url":"http://host:port/path","headers":{},"body":...}, only to
 * hosts the manifest's network_hosts and the operator's policy both allow (needs
 * the network capability). Writes {"status":200,"headers":{...},"body":"..."}
 * like kv_get: returns the full length, take_result() refetches a long one. */
SANDBUS_IMPORT(http_request)
int32_t sandbus_host_http_request(const void *req, uint32_t req_len, void *buf, uint32_t cap);

/* request(target, target_len, json, json_len, buf, cap): call another plugin's
 * function and wait for its reply, like a client request (any node serving the
 * target may answer). `target` is "plugin.function", or "plugin" for its
 * handle_request. Needs the messaging capability and a manifest
 * [permissions] request_plugins entry allowing the target, which the node's
 * operator policy ([messaging] request_plugins) must also allow: otherwise the
 * host stops the call with a security violation. A malformed target or body, a
 * body above the NATS max payload and a chain of more than 8 (the node's
 * limit) plugin-to-plugin requests stop the call too, with their own errors.
 * Returns the reply's full length (writing min(len, cap) bytes; take_result()
 * refetches a long one), or one of the negative SANDBUS_REQUEST_* codes below,
 * the error JSON {"code","message","plugin","details"} then being what
 * take_result() returns. The wait is bounded (5 s, and less than this
 * plugin's own timeout). Prefer sandbus_request(). */
SANDBUS_IMPORT(request)
int32_t sandbus_host_request(const void *target, uint32_t target_len, const void *json, uint32_t json_len,
                             void *buf, uint32_t cap);

/* take_result(buf, cap): the last kv_get / http_request / request result
 * again (for a failed request: its error JSON); -1 if none. */
SANDBUS_IMPORT(take_result)
int32_t sandbus_host_take_result(void *buf, uint32_t cap);

/* Outcomes of sandbus_host_request / sandbus_request. */
enum {
    SANDBUS_REQUEST_OK = 0,          /* sandbus_request: the reply is in *out */
    SANDBUS_REQUEST_EREMOTE = -1,    /* the target's call failed (trap, limit, unknown function...) */
    SANDBUS_REQUEST_ENOTFOUND = -2,  /* no node serves the target plugin */
    SANDBUS_REQUEST_ETIMEOUT = -3,   /* no reply in time */
    SANDBUS_REQUEST_ENOMEM = -128    /* sandbus_request only (never the host): malloc failed */
};

/* ------------------------------------------------------------------------ */
/* Required ABI exports                                                      */
/* ------------------------------------------------------------------------ */

/* Returns SANDBUS_ABI_VERSION (1). */
int32_t sandbus_abi_version(void);
/* Returns a pointer to `size` writable bytes, or NULL (0) when out of memory. */
void *sandbus_alloc(uint32_t size);
/* Frees a block from sandbus_alloc or a reply buffer. NULL is ignored. */
void sandbus_dealloc(void *ptr, uint32_t size);

#ifndef SANDBUS_NO_EXPORTS
/* What sandbus_alloc(0) returns: a zero-size block needs no storage, and a
 * static one costs nothing whether or not it is ever freed. */
static unsigned char sandbus_empty_block_[1];

SANDBUS_EXPORT(sandbus_abi_version)
int32_t sandbus_abi_version(void)
{
    return SANDBUS_ABI_VERSION;
}

SANDBUS_EXPORT(sandbus_alloc)
void *sandbus_alloc(uint32_t size)
{
    /* 0 means failure to the host, so size 0 gets a non-NULL dummy block. */
    if (size == 0)
        return sandbus_empty_block_;
    return malloc((size_t)size);
}

SANDBUS_EXPORT(sandbus_dealloc)
void sandbus_dealloc(void *ptr, uint32_t size)
{
    (void)size;
    if (ptr != (void *)sandbus_empty_block_)
        free(ptr);
}
#endif /* SANDBUS_NO_EXPORTS */

/* Prototypes of the exports the plugin itself may define (each with
 * SANDBUS_EXPORT(name) in front). Declaring them here makes the compiler
 * check their signatures. */

/* Optional: called once after instantiation with the plugin's config JSON
 * (config[0..len), not NUL-terminated; the host frees it). 0 = success,
 * anything else fails plugin start-up. */
int32_t sandbus_init(const uint8_t *config, uint32_t len);
/* Optional: called before the instance is discarded. */
void sandbus_shutdown(void);
/* Optional: 0 = healthy, anything else = unhealthy. */
int32_t sandbus_health(void);
/* The default callable function: request JSON in in[0..len) (owned by the
 * host: do not free it), returns sandbus_pack()ed reply JSON. */
uint64_t handle_request(const uint8_t *in, uint32_t len);

/* ------------------------------------------------------------------------ */
/* Host helpers                                                              */
/* ------------------------------------------------------------------------ */

/* Log a NUL-terminated message at `level` (SANDBUS_LOG_*). */
static inline void sandbus_log(int level, const char *msg)
{
    sandbus_host_log((int32_t)level, msg, (uint32_t)strlen(msg));
}

/* Log `len` bytes at `ptr` (need not be NUL-terminated) at `level`. */
static inline void sandbus_log_n(int level, const void *ptr, size_t len)
{
    sandbus_host_log((int32_t)level, ptr, (uint32_t)len);
}

/* Publish `len` bytes of JSON onto `topic` (NUL-terminated). See sandbus_host_publish. */
static inline int32_t sandbus_publish(const char *topic, const void *json, size_t len)
{
    return sandbus_host_publish(topic, (uint32_t)strlen(topic), json, (uint32_t)len);
}

/* Call `target` ("plugin.function" or "plugin", NUL-terminated) with `len`
 * bytes of request JSON. On SANDBUS_REQUEST_OK (0), *out is the reply; on a
 * negative SANDBUS_REQUEST_E* code it is the error JSON
 * {"code","message","plugin","details"} (code e.g. "sandbox.trap",
 * "plugin.not_found", "bus.timeout"). Either way *out is a fresh malloc'd,
 * NUL-terminated buffer the caller frees, and *out_len (if not NULL) its
 * length; on SANDBUS_REQUEST_ENOMEM *out is NULL. See sandbus_host_request
 * for what stops the call instead of returning. */
static inline int32_t sandbus_request(const char *target, const void *json, size_t len, char **out,
                                      size_t *out_len)
{
    uint32_t cap = 1024;
    int32_t status = 0, n;
    char *buf = (char *)malloc(cap + 1u), *bigger;
    *out = NULL;
    if (out_len)
        *out_len = 0;
    if (buf == NULL)
        return SANDBUS_REQUEST_ENOMEM;
    n = sandbus_host_request(target, (uint32_t)strlen(target), json, (uint32_t)len, buf, cap);
    if (n < 0) {
        status = n; /* the error JSON waits in take_result */
        n = sandbus_host_take_result(buf, cap);
        if (n < 0) /* cannot happen: the host always leaves the error */
            n = 0;
    }
    if ((uint32_t)n > cap) {
        bigger = (char *)realloc(buf, (size_t)(uint32_t)n + 1u);
        if (bigger == NULL) {
            free(buf);
            return SANDBUS_REQUEST_ENOMEM;
        }
        buf = bigger;
        sandbus_host_take_result(buf, (uint32_t)n);
    }
    buf[n] = '\0';
    *out = buf;
    if (out_len)
        *out_len = (size_t)(uint32_t)n;
    return status;
}

/* Unix time in milliseconds. Requires the clock capability. */
static inline int64_t sandbus_time_ms(void)
{
    return sandbus_host_time_now_ms();
}

/* Read environment variable `name` (NUL-terminated) into buf (capacity cap).
 * Returns the value's full byte length (which may be > cap: then only cap
 * bytes were written, call again with a larger buffer), or -1 if unset.
 * The value is NOT NUL-terminated by the host; this helper adds a NUL when
 * there is room (length < cap). */
static inline int32_t sandbus_getenv(const char *name, char *buf, size_t cap)
{
    int32_t n = sandbus_host_env_get(name, (uint32_t)strlen(name), buf, (uint32_t)cap);
    if (n >= 0 && (size_t)n < cap)
        buf[n] = '\0';
    return n;
}

/* ------------------------------------------------------------------------ */
/* Replies                                                                   */
/* ------------------------------------------------------------------------ */

/* Pack a reply pointer and length into the i64 a callable function returns:
 * (ptr << 32) | len. The block must be freeable by sandbus_dealloc. */
static inline uint64_t sandbus_pack(const void *ptr, size_t len)
{
    return ((uint64_t)(uintptr_t)ptr << 32) | (uint64_t)(uint32_t)len;
}

/* Copy `len` bytes of `json` into a fresh malloc'd block and return the
 * packed reply. Traps (the call fails) if memory is exhausted: there is no
 * meaningful reply to return then. */
static inline uint64_t sandbus_reply(const char *json, size_t len)
{
    char *p = (char *)malloc(len ? len : 1u);
    if (p == NULL)
        __builtin_trap();
    if (len)
        memcpy(p, json, len);
    return sandbus_pack(p, len);
}

/* Same as sandbus_reply for a NUL-terminated string. */
static inline uint64_t sandbus_reply_str(const char *json)
{
    return sandbus_reply(json, strlen(json));
}

/* ------------------------------------------------------------------------ */
/* JSON writer                                                               */
/* ------------------------------------------------------------------------ */

/* A growable byte buffer (malloc'd). Zero-initialise it (or call
 * sandbus_buf_init). After an allocation failure `oom` is set and every
 * further append is a no-op; check it before using the result. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
    int oom;
} sandbus_buf;

/* Initialise an empty buffer (no allocation yet). */
static inline void sandbus_buf_init(sandbus_buf *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->oom = 0;
}

/* Free the buffer's storage and reset it to empty. */
static inline void sandbus_buf_free(sandbus_buf *b)
{
    free(b->data);
    sandbus_buf_init(b);
}

/* Make room for `extra` more bytes. Returns 1 on success, 0 (and sets oom)
 * on failure. */
static inline int sandbus_buf_reserve(sandbus_buf *b, size_t extra)
{
    size_t need, ncap;
    char *nd;
    if (b->oom)
        return 0;
    if (extra <= b->cap - b->len)
        return 1;
    if (extra > SIZE_MAX - b->len) {
        b->oom = 1;
        return 0;
    }
    need = b->len + extra;
    ncap = b->cap ? b->cap : 64;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2) {
            ncap = need;
            break;
        }
        ncap *= 2;
    }
    nd = (char *)realloc(b->data, ncap);
    if (nd == NULL) {
        b->oom = 1;
        return 0;
    }
    b->data = nd;
    b->cap = ncap;
    return 1;
}

/* Append `n` raw bytes (no escaping: use for JSON you already trust, e.g.
 * a value returned by sandbus_json_get). */
static inline void sandbus_buf_raw(sandbus_buf *b, const void *s, size_t n)
{
    if (n == 0 || !sandbus_buf_reserve(b, n))
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

/* Append a NUL-terminated string raw (no escaping). */
static inline void sandbus_buf_cstr(sandbus_buf *b, const char *s)
{
    sandbus_buf_raw(b, s, strlen(s));
}

/* Append one raw byte. */
static inline void sandbus_buf_char(sandbus_buf *b, char c)
{
    if (!sandbus_buf_reserve(b, 1))
        return;
    b->data[b->len++] = c;
}

/* Append the *contents* of a JSON string (no surrounding quotes) for the
 * `n` bytes at `s`: '"' and '\\' are backslash-escaped, control characters
 * (< 0x20) become \b \f \n \r \t or \u00XX, DEL becomes \u007f; all other
 * bytes (including UTF-8 sequences) are copied as they are. */
static inline void sandbus_buf_json_chars(sandbus_buf *b, const void *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t i, run = 0; /* start of the current run of bytes needing no escape */
    for (i = 0; i < n; i++) {
        unsigned char c = p[i];
        char esc[6];
        size_t elen = 2;
        if (c >= 0x20 && c != '"' && c != '\\' && c != 0x7f)
            continue;
        sandbus_buf_raw(b, p + run, i - run);
        run = i + 1;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            elen = 6;
            break;
        }
        sandbus_buf_raw(b, esc, elen);
    }
    sandbus_buf_raw(b, p + run, n - run);
}

/* Append a JSON string: '"', the escaped `n` bytes at `s`, '"'. */
static inline void sandbus_buf_json_string(sandbus_buf *b, const void *s, size_t n)
{
    sandbus_buf_char(b, '"');
    sandbus_buf_json_chars(b, s, n);
    sandbus_buf_char(b, '"');
}

/* Append a NUL-terminated C string as a JSON string. */
static inline void sandbus_buf_json_cstr(sandbus_buf *b, const char *s)
{
    sandbus_buf_json_string(b, s, strlen(s));
}

/* Append an unsigned integer in decimal. */
static inline void sandbus_buf_u64(sandbus_buf *b, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + (int)(v % 10u));
        v /= 10u;
    } while (v != 0);
    sandbus_buf_raw(b, tmp + i, sizeof tmp - i);
}

/* Append a signed integer in decimal. */
static inline void sandbus_buf_i64(sandbus_buf *b, int64_t v)
{
    if (v < 0) {
        sandbus_buf_char(b, '-');
        sandbus_buf_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        sandbus_buf_u64(b, (uint64_t)v);
    }
}

/* Hand the buffer over as the reply: returns the packed (ptr, len) of the
 * buffer's own storage (no copy) and resets `b` to empty. The host frees
 * the storage. Traps if the buffer hit an allocation failure (oom), since a
 * truncated reply would be wrong JSON. */
static inline uint64_t sandbus_buf_reply(sandbus_buf *b)
{
    uint64_t r;
    if (b->oom)
        __builtin_trap();
    if (b->data == NULL && !sandbus_buf_reserve(b, 1))
        __builtin_trap();
    r = sandbus_pack(b->data, b->len);
    sandbus_buf_init(b);
    return r;
}

/* ------------------------------------------------------------------------ */
/* JSON reader                                                               */
/* ------------------------------------------------------------------------ */

/* Result codes of the JSON reader. */
typedef enum {
    SANDBUS_JSON_OK = 0,
    SANDBUS_JSON_ENOTFOUND = -1,  /* the object has no such member */
    SANDBUS_JSON_EEMPTY = -2,     /* no JSON value at all (empty / blank) */
    SANDBUS_JSON_ESYNTAX = -3,    /* malformed JSON */
    SANDBUS_JSON_ENOTOBJECT = -4, /* valid JSON, but not an object */
    SANDBUS_JSON_EDEPTH = -5,     /* nested deeper than SANDBUS_JSON_MAX_DEPTH */
    SANDBUS_JSON_ETRAILING = -6,  /* extra text after the JSON value */
    SANDBUS_JSON_ETYPE = -7       /* the value has another type than asked */
} sandbus_json_result;

/* Kind of a JSON value. */
typedef enum {
    SANDBUS_JSON_INVALID = 0,
    SANDBUS_JSON_OBJECT,
    SANDBUS_JSON_ARRAY,
    SANDBUS_JSON_STRING,
    SANDBUS_JSON_NUMBER,
    SANDBUS_JSON_TRUE,
    SANDBUS_JSON_FALSE,
    SANDBUS_JSON_NULL
} sandbus_json_type;

/* The raw text of one JSON value inside a document: `ptr[0..len)` is the
 * exact source text (a string includes its quotes and escapes), ready to be
 * copied verbatim into another JSON document. */
typedef struct {
    const uint8_t *ptr;
    size_t len;
    sandbus_json_type type;
} sandbus_json_value;

/* Maximum nesting of arrays/objects the reader accepts (no recursion is
 * used; this only bounds a small bitmap on the stack). */
#ifndef SANDBUS_JSON_MAX_DEPTH
#define SANDBUS_JSON_MAX_DEPTH 512
#endif

/* A human-readable reason for a sandbus_json_result. */
static inline const char *sandbus_json_strerror(int code)
{
    switch (code) {
    case SANDBUS_JSON_OK: return "ok";
    case SANDBUS_JSON_ENOTFOUND: return "member not found";
    case SANDBUS_JSON_EEMPTY: return "empty input";
    case SANDBUS_JSON_ESYNTAX: return "malformed JSON";
    case SANDBUS_JSON_ENOTOBJECT: return "not a JSON object";
    case SANDBUS_JSON_EDEPTH: return "JSON nested too deeply";
    case SANDBUS_JSON_ETRAILING: return "trailing data after JSON value";
    case SANDBUS_JSON_ETYPE: return "value has the wrong type";
    default: return "unknown error";
    }
}

static inline size_t sandbus_json__ws(const uint8_t *s, size_t len, size_t i)
{
    while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
        i++;
    return i;
}

static inline int sandbus_json__hexval(uint8_t c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Read 4 hex digits at s[i..i+4) (bounds already checked). -1 if not hex. */
static inline int32_t sandbus_json__hex4(const uint8_t *s, size_t i)
{
    int32_t v = 0;
    size_t k;
    for (k = 0; k < 4; k++) {
        int h = sandbus_json__hexval(s[i + k]);
        if (h < 0)
            return -1;
        v = (v << 4) | h;
    }
    return v;
}

/* Length of the valid UTF-8 sequence starting at s[i] (i < len), or 0 if
 * it is not valid (overlong, surrogate, > U+10FFFF, truncated). */
static inline size_t sandbus_json__utf8_len(const uint8_t *s, size_t len, size_t i)
{
    uint8_t c = s[i];
    size_t n, k;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0;
    if (c < 0xE0) n = 2;
    else if (c < 0xF0) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c < 0xF5) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    if (n > len - i) return 0;
    if (s[i + 1] < lo || s[i + 1] > hi) return 0;
    for (k = 2; k < n; k++)
        if (s[i + k] < 0x80 || s[i + k] > 0xBF) return 0;
    return n;
}

/* Skip a string whose opening quote is at s[*pos]. On success *pos is just
 * past the closing quote. Validates escapes and UTF-8, rejects raw control
 * characters. */
static inline int sandbus_json__skip_string(const uint8_t *s, size_t len, size_t *pos)
{
    size_t i = *pos + 1;
    while (i < len) {
        uint8_t c = s[i];
        if (c == '"') {
            *pos = i + 1;
            return SANDBUS_JSON_OK;
        }
        if (c < 0x20)
            return SANDBUS_JSON_ESYNTAX;
        if (c == '\\') {
            if (i + 1 >= len)
                return SANDBUS_JSON_ESYNTAX;
            c = s[i + 1];
            if (c == 'u') {
                if (len - i < 6 || sandbus_json__hex4(s, i + 2) < 0)
                    return SANDBUS_JSON_ESYNTAX;
                i += 6;
            } else if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' ||
                       c == 'r' || c == 't') {
                i += 2;
            } else {
                return SANDBUS_JSON_ESYNTAX;
            }
        } else if (c < 0x80) {
            i++;
        } else {
            size_t n = sandbus_json__utf8_len(s, len, i);
            if (n == 0)
                return SANDBUS_JSON_ESYNTAX;
            i += n;
        }
    }
    return SANDBUS_JSON_ESYNTAX; /* unterminated */
}

/* Skip a number starting at s[*pos] (JSON grammar: -?int frac? exp?). */
static inline int sandbus_json__skip_number(const uint8_t *s, size_t len, size_t *pos)
{
    size_t i = *pos;
    if (i < len && s[i] == '-')
        i++;
    if (i >= len)
        return SANDBUS_JSON_ESYNTAX;
    if (s[i] == '0') {
        i++;
    } else if (s[i] >= '1' && s[i] <= '9') {
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    } else {
        return SANDBUS_JSON_ESYNTAX;
    }
    if (i < len && s[i] == '.') {
        i++;
        if (i >= len || s[i] < '0' || s[i] > '9')
            return SANDBUS_JSON_ESYNTAX;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < len && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= len || s[i] < '0' || s[i] > '9')
            return SANDBUS_JSON_ESYNTAX;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    *pos = i;
    return SANDBUS_JSON_OK;
}

/* Skip one complete JSON value starting at s[*pos] (leading whitespace
 * allowed). On success *pos is just past the value, out (if not NULL)
 * receives its raw span and type. Iterative: nesting is bounded by
 * SANDBUS_JSON_MAX_DEPTH, not by the C stack. */
static inline int sandbus_json_skip_value(const uint8_t *s, size_t len, size_t *pos,
                                          sandbus_json_value *out)
{
    /* bit d set = the container at depth d is an object */
    unsigned char kinds[(SANDBUS_JSON_MAX_DEPTH + 7) / 8];
    size_t depth = 0, i = sandbus_json__ws(s, len, *pos), start;
    sandbus_json_type type = SANDBUS_JSON_INVALID;
    int rc, expect_key = 0;

    if (i >= len)
        return SANDBUS_JSON_EEMPTY;
    memset(kinds, 0, sizeof kinds);
    start = i;
    for (;;) {
        /* --- parse one value (or, inside an object, a key and its ':') --- */
        i = sandbus_json__ws(s, len, i);
        if (i >= len)
            return SANDBUS_JSON_ESYNTAX;
        if (expect_key) {
            if (s[i] != '"')
                return SANDBUS_JSON_ESYNTAX;
            if ((rc = sandbus_json__skip_string(s, len, &i)) != SANDBUS_JSON_OK)
                return rc;
            i = sandbus_json__ws(s, len, i);
            if (i >= len || s[i] != ':')
                return SANDBUS_JSON_ESYNTAX;
            i = sandbus_json__ws(s, len, i + 1);
            if (i >= len)
                return SANDBUS_JSON_ESYNTAX;
            expect_key = 0;
        }
        {
            uint8_t c = s[i];
            sandbus_json_type t;
            if (c == '{' || c == '[') {
                if (depth >= SANDBUS_JSON_MAX_DEPTH)
                    return SANDBUS_JSON_EDEPTH;
                if (c == '{')
                    kinds[depth / 8] = (unsigned char)(kinds[depth / 8] | (1u << (depth % 8)));
                else
                    kinds[depth / 8] = (unsigned char)(kinds[depth / 8] & ~(1u << (depth % 8)));
                t = c == '{' ? SANDBUS_JSON_OBJECT : SANDBUS_JSON_ARRAY;
                if (depth == 0)
                    type = t;
                depth++;
                i = sandbus_json__ws(s, len, i + 1);
                if (i >= len)
                    return SANDBUS_JSON_ESYNTAX;
                if (s[i] == (c == '{' ? '}' : ']')) {
                    depth--;
                    i++;
                    /* fall through to "after a value" */
                } else {
                    expect_key = (c == '{');
                    continue; /* parse the first element / member */
                }
            } else if (c == '"') {
                if ((rc = sandbus_json__skip_string(s, len, &i)) != SANDBUS_JSON_OK)
                    return rc;
                t = SANDBUS_JSON_STRING;
            } else if (c == '-' || (c >= '0' && c <= '9')) {
                if ((rc = sandbus_json__skip_number(s, len, &i)) != SANDBUS_JSON_OK)
                    return rc;
                t = SANDBUS_JSON_NUMBER;
            } else if (c == 't' && len - i >= 4 && memcmp(s + i, "true", 4) == 0) {
                i += 4;
                t = SANDBUS_JSON_TRUE;
            } else if (c == 'f' && len - i >= 5 && memcmp(s + i, "false", 5) == 0) {
                i += 5;
                t = SANDBUS_JSON_FALSE;
            } else if (c == 'n' && len - i >= 4 && memcmp(s + i, "null", 4) == 0) {
                i += 4;
                t = SANDBUS_JSON_NULL;
            } else {
                return SANDBUS_JSON_ESYNTAX;
            }
            if (depth == 0 && type == SANDBUS_JSON_INVALID)
                type = t;
        }
        /* --- after a complete value: close containers / go to the next --- */
        for (;;) {
            int is_obj;
            if (depth == 0) {
                *pos = i;
                if (out) {
                    out->ptr = s + start;
                    out->len = i - start;
                    out->type = type;
                }
                return SANDBUS_JSON_OK;
            }
            i = sandbus_json__ws(s, len, i);
            if (i >= len)
                return SANDBUS_JSON_ESYNTAX;
            is_obj = (kinds[(depth - 1) / 8] >> ((depth - 1) % 8)) & 1;
            if (s[i] == ',') {
                i++;
                expect_key = is_obj;
                break; /* parse the next element / member */
            }
            if (s[i] == (is_obj ? '}' : ']')) {
                i++;
                depth--;
                continue; /* the container itself was a complete value */
            }
            return SANDBUS_JSON_ESYNTAX;
        }
    }
}

/* Check that json[0..len) is exactly one valid JSON value (surrounding
 * whitespace allowed). Returns SANDBUS_JSON_OK or an error code; `out`
 * (may be NULL) receives the value's span. */
static inline int sandbus_json_validate(const void *json, size_t len, sandbus_json_value *out)
{
    const uint8_t *s = (const uint8_t *)json;
    size_t i = 0;
    int rc = sandbus_json_skip_value(s, len, &i, out);
    if (rc != SANDBUS_JSON_OK)
        return rc;
    if (sandbus_json__ws(s, len, i) != len)
        return SANDBUS_JSON_ETRAILING;
    return SANDBUS_JSON_OK;
}

/* Decode the next character of the *contents* of a JSON string s[*i..end)
 * (already validated) into UTF-8 at out[0..4). Returns the number of bytes
 * written. Unpaired surrogate escapes decode to U+FFFD. */
static inline size_t sandbus_json__decode_char(const uint8_t *s, size_t end, size_t *i, uint8_t out[4])
{
    uint32_t cp;
    size_t p = *i;
    if (s[p] != '\\') {
        out[0] = s[p];
        *i = p + 1;
        return 1;
    }
    switch (s[p + 1]) {
    case 'b': out[0] = '\b'; *i = p + 2; return 1;
    case 'f': out[0] = '\f'; *i = p + 2; return 1;
    case 'n': out[0] = '\n'; *i = p + 2; return 1;
    case 'r': out[0] = '\r'; *i = p + 2; return 1;
    case 't': out[0] = '\t'; *i = p + 2; return 1;
    case 'u': break;
    default: out[0] = s[p + 1]; *i = p + 2; return 1; /* " \ / */
    }
    cp = (uint32_t)sandbus_json__hex4(s, p + 2);
    p += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        int32_t lo = -1;
        if (end - p >= 6 && s[p] == '\\' && s[p + 1] == 'u')
            lo = sandbus_json__hex4(s, p + 2);
        if (lo >= 0xDC00 && lo <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + ((uint32_t)lo - 0xDC00);
            p += 6;
        } else {
            cp = 0xFFFD;
        }
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        cp = 0xFFFD;
    }
    *i = p;
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* Does the raw string token tok[0..toklen) (with quotes, as validated by the
 * reader) decode to exactly key[0..keylen)? */
static inline int sandbus_json__string_equals(const uint8_t *tok, size_t toklen, const char *key,
                                              size_t keylen)
{
    size_t i = 1, end = toklen - 1, k = 0;
    const uint8_t *kk = (const uint8_t *)key;
    while (i < end) {
        uint8_t ch[4];
        size_t n = sandbus_json__decode_char(tok, end, &i, ch);
        if (n > keylen - k || memcmp(ch, kk + k, n) != 0)
            return 0;
        k += n;
    }
    return k == keylen;
}

/* Decode a STRING value into buf (capacity cap) as UTF-8 (escapes resolved,
 * unpaired surrogates become U+FFFD). Returns the full decoded length
 * (writes min(length, cap) bytes and adds a NUL when length < cap), or -1
 * if `v` is not a string. The decoded length never exceeds v->len - 2, so a
 * buffer of v->len bytes always suffices (with room for the NUL). */
static inline long sandbus_json_string(const sandbus_json_value *v, char *buf, size_t cap)
{
    size_t i = 1, end, n = 0;
    if (v == NULL || v->type != SANDBUS_JSON_STRING || v->len < 2)
        return -1;
    end = v->len - 1;
    while (i < end) {
        uint8_t ch[4];
        size_t k, m = sandbus_json__decode_char(v->ptr, end, &i, ch);
        for (k = 0; k < m; k++, n++)
            if (n < cap)
                buf[n] = (char)ch[k];
    }
    if (n < cap)
        buf[n] = '\0';
    return (long)n;
}

/* Find member `key` (NUL-terminated, compared after decoding escapes) of
 * the top-level object in json[0..len). The whole document is validated
 * first, so a malformed request is reported even when the key comes early.
 * If the key occurs more than once the last occurrence wins (like most JSON
 * parsers). Returns:
 *   SANDBUS_JSON_OK         found; *out holds the raw value text and type
 *   SANDBUS_JSON_ENOTFOUND  valid object without that member
 *   SANDBUS_JSON_ENOTOBJECT valid JSON that is not an object
 *   other negative codes    the document is invalid (see sandbus_json_strerror)
 */
static inline int sandbus_json_get(const void *json, size_t len, const char *key, sandbus_json_value *out)
{
    const uint8_t *s = (const uint8_t *)json;
    size_t i, keylen = strlen(key);
    sandbus_json_value doc;
    int found = 0, rc = sandbus_json_validate(s, len, &doc);
    if (rc != SANDBUS_JSON_OK)
        return rc;
    if (doc.type != SANDBUS_JSON_OBJECT)
        return SANDBUS_JSON_ENOTOBJECT;
    /* The document is valid, so the walk below cannot fail; bounds are still
     * checked by the skip helpers. */
    i = (size_t)(doc.ptr - s) + 1;
    for (;;) {
        size_t kstart;
        sandbus_json_value val;
        i = sandbus_json__ws(s, len, i);
        if (i >= len || s[i] == '}')
            break;
        if (s[i] == ',')
            i = sandbus_json__ws(s, len, i + 1);
        kstart = i;
        if (sandbus_json__skip_string(s, len, &i) != SANDBUS_JSON_OK)
            return SANDBUS_JSON_ESYNTAX;
        {
            size_t klen = i - kstart;
            i = sandbus_json__ws(s, len, i);
            if (i >= len || s[i] != ':')
                return SANDBUS_JSON_ESYNTAX;
            i++;
            if (sandbus_json_skip_value(s, len, &i, &val) != SANDBUS_JSON_OK)
                return SANDBUS_JSON_ESYNTAX;
            if (sandbus_json__string_equals(s + kstart, klen, key, keylen)) {
                if (out)
                    *out = val;
                found = 1;
            }
        }
    }
    return found ? SANDBUS_JSON_OK : SANDBUS_JSON_ENOTFOUND;
}

/* Convenience: find top-level string member `key` and decode it into a fresh
 * malloc'd, NUL-terminated buffer (*out_str, length *out_len; the string may
 * contain NUL bytes from \u0000, so prefer the length). The caller frees it.
 * Returns SANDBUS_JSON_OK, SANDBUS_JSON_ETYPE if the member is not a
 * string, or any code of sandbus_json_get. Traps if out of memory. */
static inline int sandbus_json_get_string(const void *json, size_t len, const char *key, char **out_str,
                                          size_t *out_len)
{
    sandbus_json_value v;
    char *buf;
    long n;
    int rc = sandbus_json_get(json, len, key, &v);
    if (rc != SANDBUS_JSON_OK)
        return rc;
    if (v.type != SANDBUS_JSON_STRING)
        return SANDBUS_JSON_ETYPE;
    buf = (char *)malloc(v.len); /* decoded length <= v.len - 2 */
    if (buf == NULL)
        __builtin_trap();
    n = sandbus_json_string(&v, buf, v.len);
    *out_str = buf;
    if (out_len)
        *out_len = (size_t)n;
    return SANDBUS_JSON_OK;
}

#ifdef __cplusplus
}
#endif

#endif /* SANDBUS_H */
