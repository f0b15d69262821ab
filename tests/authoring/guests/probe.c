/* probe: a C guest exercising what sandbus.sdk.testing collects -- replies, logs, the clock capability,
 * fuel, publishing -- built by sandbus.host.authoring (the same path as `sandbus build`). */
#include "sandbus.h"

static uint64_t ok(const char *result_json)
{
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"success\":true,\"result\":");
    sandbus_buf_cstr(&b, result_json);
    sandbus_buf_cstr(&b, ",\"error\":null}");
    return sandbus_buf_reply(&b);
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"success\":true,\"result\":");
    sandbus_buf_raw(&b, in, len);
    sandbus_buf_cstr(&b, ",\"error\":null}");
    return sandbus_buf_reply(&b);
}

SANDBUS_EXPORT(fail)
uint64_t fail(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    return sandbus_reply_str("{\"success\":false,\"result\":null,\"error\":\"asked to fail\"}");
}

SANDBUS_EXPORT(chatty)
uint64_t chatty(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    sandbus_log(SANDBUS_LOG_DEBUG, "probe: debug line");
    sandbus_log(SANDBUS_LOG_INFO, "probe: info line");
    sandbus_log(SANDBUS_LOG_WARN, "probe: warning line");
    return ok("{}");
}

SANDBUS_EXPORT(now)
uint64_t now(const uint8_t *in, uint32_t len)
{
    sandbus_buf b;
    (void)in;
    (void)len;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"success\":true,\"result\":");
    sandbus_buf_i64(&b, sandbus_time_ms());
    sandbus_buf_cstr(&b, ",\"error\":null}");
    return sandbus_buf_reply(&b);
}

SANDBUS_EXPORT(spin)
uint64_t spin(const uint8_t *in, uint32_t len)
{
    volatile uint32_t n = len;
    (void)in;
    for (;;)
        n = n * 1103515245u + 12345u;
    return 0;
}

/* {"topic": "..."} -> publishes {"from":"probe"} there */
SANDBUS_EXPORT(announce)
uint64_t announce(const uint8_t *in, uint32_t len)
{
    char *topic = NULL;
    static const char payload[] = "{\"from\":\"probe\"}";
    if (sandbus_json_get_string(in, len, "topic", &topic, NULL) != SANDBUS_JSON_OK)
        return sandbus_reply_str("{\"success\":false,\"result\":null,\"error\":\"expected {\\\"topic\\\": ...}\"}");
    sandbus_publish(topic, payload, sizeof payload - 1);
    free(topic);
    return ok("\"published\"");
}
