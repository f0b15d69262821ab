/* Calls other plugins through the `request` host function (tests/bus/test_bus_request.py).
 * Compiled once per name with -DPLUGIN_NAME=... ("caller", "callee", "looper").
 *
 *   handle_request {"target": T, "payload": P}  sandbus_request(T, P)
 *                  -> {"status": S, "body": <the reply, or the error JSON>}
 *   call_raw       the same through the raw import, with a 16-byte buffer and take_result
 *                  -> {"status": S, "body": ..., "prefix_ok": true|false}
 *   loop           requests PLUGIN_NAME.loop with its own request: a request cycle. Passes a
 *                  reply through untouched; a failure becomes {"status": S, "body": <error JSON>}
 *   boom           traps
 */
#include "sandbus.h"

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "caller"
#endif

static uint64_t outcome(int32_t status, const char *body, size_t body_len, int prefix_ok)
{
    sandbus_buf out;
    sandbus_buf_init(&out);
    sandbus_buf_cstr(&out, "{\"status\":");
    sandbus_buf_i64(&out, status);
    sandbus_buf_cstr(&out, ",\"body\":");
    sandbus_buf_raw(&out, body, body_len); /* a reply or an error JSON: valid JSON either way */
    if (prefix_ok >= 0)
        sandbus_buf_cstr(&out, prefix_ok ? ",\"prefix_ok\":true" : ",\"prefix_ok\":false");
    sandbus_buf_cstr(&out, "}");
    return sandbus_buf_reply(&out);
}

/* The "target" string and the raw "payload" of {"target": T, "payload": P}; 0 on success. */
static int parse(const uint8_t *in, uint32_t len, char **target, sandbus_json_value *payload)
{
    if (sandbus_json_get_string(in, len, "target", target, NULL) != SANDBUS_JSON_OK)
        return -1;
    if (sandbus_json_get(in, len, "payload", payload) != SANDBUS_JSON_OK) {
        free(*target);
        return -1;
    }
    return 0;
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    char *target, *body;
    size_t body_len;
    sandbus_json_value payload;
    int32_t status;
    uint64_t r;
    if (parse(in, len, &target, &payload) != 0)
        return sandbus_reply_str("{\"error\":\"expected {\\\"target\\\": ..., \\\"payload\\\": ...}\"}");
    status = sandbus_request(target, payload.ptr, payload.len, &body, &body_len);
    free(target);
    if (status == SANDBUS_REQUEST_ENOMEM)
        return sandbus_reply_str("{\"error\":\"out of memory\"}");
    r = outcome(status, body, body_len, -1);
    free(body);
    return r;
}

SANDBUS_EXPORT(call_raw)
uint64_t call_raw(const uint8_t *in, uint32_t len)
{
    char *target, *body;
    char small[16];
    sandbus_json_value payload;
    int32_t status = 0, n, again;
    int prefix_ok;
    uint64_t r;
    if (parse(in, len, &target, &payload) != 0)
        return sandbus_reply_str("{\"error\":\"bad request\"}");
    memset(small, 0, sizeof small);
    n = sandbus_host_request(target, (uint32_t)strlen(target), payload.ptr, (uint32_t)payload.len, small,
                             sizeof small);
    free(target);
    if (n < 0) {
        status = n;
        n = sandbus_host_take_result(NULL, 0); /* the error JSON's length; nothing written */
    }
    body = malloc((size_t)n + 1u);
    if (body == NULL)
        __builtin_trap();
    again = sandbus_host_take_result(body, (uint32_t)n);
    /* On success the host wrote the first min(n, 16) bytes of the same reply into `small`;
     * on failure it wrote nothing there. */
    if (status == 0)
        prefix_ok = again == n && memcmp(small, body, (size_t)n < sizeof small ? (size_t)n : sizeof small) == 0;
    else
        prefix_ok = again == n && small[0] == 0;
    r = outcome(status, body, (size_t)n, prefix_ok);
    free(body);
    return r;
}

SANDBUS_EXPORT(loop)
uint64_t loop(const uint8_t *in, uint32_t len)
{
    char *body;
    size_t body_len;
    uint64_t r;
    int32_t status = sandbus_request(PLUGIN_NAME ".loop", in, len, &body, &body_len);
    if (status == SANDBUS_REQUEST_ENOMEM)
        return sandbus_reply_str("{\"error\":\"out of memory\"}");
    if (status == SANDBUS_REQUEST_OK)
        r = sandbus_reply(body, body_len);
    else
        r = outcome(status, body, body_len, -1);
    free(body);
    return r;
}

SANDBUS_EXPORT(boom)
uint64_t boom(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    __builtin_trap();
}
