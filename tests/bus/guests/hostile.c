/* Host-function abuse for tests/bus/test_hardening_hostfuncs.py.
 *
 *   http_raw       the request JSON is handed to http_request as it came; the reply is the result
 *   oversize       {"what": "log"|"publish"|"http"|"request"|"kv"|"env", "len": N, "alloc": M}: calls that
 *                  host function with a buffer of N bytes, at a fresh M-byte allocation (M = 0: at address 0)
 *   request_twice  {"target": T, "payload": P}: two requests one after the other -> {"first": S1, "second": S2}
 *   publish_one    publishes {} onto big.t -> {"returned": S}
 *   request_loop   requests spinner.loop_forever again and again, for ever (each one times out)
 *   publish_deep   {"depth": N}: publishes an array nested N levels deep onto big.t -> {"returned": S}
 */
#include "sandbus.h"
#include <stdlib.h>

static long long num(const uint8_t *in, uint32_t len, const char *key)
{
    sandbus_json_value v;
    if (sandbus_json_get(in, len, key, &v) != SANDBUS_JSON_OK)
        return 0;
    return strtoll((const char *)v.ptr, NULL, 10);
}

/* {"returned": r}: what a host function returned, for the test to check. */
static uint64_t reply_returned(int64_t r)
{
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"returned\":");
    sandbus_buf_i64(&b, r);
    sandbus_buf_cstr(&b, "}");
    return sandbus_buf_reply(&b);
}

SANDBUS_EXPORT(http_raw)
uint64_t http_raw(const uint8_t *in, uint32_t len)
{
    char small[64];
    int32_t full = sandbus_host_http_request(in, len, small, sizeof small);
    char *buf = malloc((size_t)full);
    if (!buf)
        return sandbus_reply_str("{\"error\":\"oom\"}");
    sandbus_host_take_result(buf, (uint32_t)full);
    uint64_t r = sandbus_reply(buf, (size_t)full);
    free(buf);
    return r;
}

SANDBUS_EXPORT(oversize)
uint64_t oversize(const uint8_t *in, uint32_t len)
{
    char *what = NULL;
    uint32_t n = (uint32_t)num(in, len, "len");
    size_t alloc = (size_t)num(in, len, "alloc");
    char *p = NULL;
    char out[16];
    int32_t r = 0;
    if (sandbus_json_get_string(in, len, "what", &what, NULL) != SANDBUS_JSON_OK)
        return sandbus_reply_str("{\"error\":\"what?\"}");
    if (alloc) {
        p = malloc(alloc);
        if (!p)
            return sandbus_reply_str("{\"error\":\"oom\"}");
        memset(p, 'x', alloc);
    }
    if (strcmp(what, "log") == 0)
        sandbus_host_log(SANDBUS_LOG_INFO, p, n);
    else if (strcmp(what, "publish") == 0)
        r = sandbus_host_publish("big.t", 5, p, n);
    else if (strcmp(what, "http") == 0)
        r = sandbus_host_http_request(p, n, out, sizeof out);
    else if (strcmp(what, "request") == 0)
        r = sandbus_host_request(p, n, "{}", 2, out, sizeof out);
    else if (strcmp(what, "kv") == 0)
        r = sandbus_host_kv_put("k", 1, p, n);
    else if (strcmp(what, "env") == 0)
        r = sandbus_host_env_get(p, n, out, sizeof out);
    free(what);
    free(p);
    return reply_returned(r);
}

SANDBUS_EXPORT(request_twice)
uint64_t request_twice(const uint8_t *in, uint32_t len)
{
    char *target, *body;
    size_t body_len;
    sandbus_json_value payload;
    int32_t s1, s2;
    if (sandbus_json_get_string(in, len, "target", &target, NULL) != SANDBUS_JSON_OK ||
        sandbus_json_get(in, len, "payload", &payload) != SANDBUS_JSON_OK)
        return sandbus_reply_str("{\"error\":\"expected {\\\"target\\\": ..., \\\"payload\\\": ...}\"}");
    s1 = sandbus_request(target, payload.ptr, payload.len, &body, &body_len);
    free(body);
    s2 = sandbus_request(target, payload.ptr, payload.len, &body, &body_len);
    free(body);
    free(target);
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"first\":");
    sandbus_buf_i64(&b, s1);
    sandbus_buf_cstr(&b, ",\"second\":");
    sandbus_buf_i64(&b, s2);
    sandbus_buf_cstr(&b, "}");
    return sandbus_buf_reply(&b);
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    return sandbus_reply((const char *)in, len);
}

SANDBUS_EXPORT(publish_one)
uint64_t publish_one(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    int32_t r = sandbus_host_publish("big.t", 5, "{}", 2);
    return reply_returned(r);
}

SANDBUS_EXPORT(request_loop)
uint64_t request_loop(const uint8_t *in, uint32_t len)
{
    char out[16];
    (void)in;
    (void)len;
    for (;;)
        sandbus_host_request("spinner.loop_forever", 20, "{}", 2, out, sizeof out);
}

SANDBUS_EXPORT(publish_deep)
uint64_t publish_deep(const uint8_t *in, uint32_t len)
{
    uint32_t depth = (uint32_t)num(in, len, "depth");
    char *p = malloc((size_t)depth * 2 + 1);
    if (!p)
        return sandbus_reply_str("{\"error\":\"oom\"}");
    memset(p, '[', depth);
    memset(p + depth, ']', depth);
    int32_t r = sandbus_host_publish("big.t", 5, p, depth * 2);
    free(p);
    return reply_returned(r);
}
