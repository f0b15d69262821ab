/*
 * text_processor - the design's example plugin, written against the C guest
 * SDK (sdk/guest/c/sandbus.h). Guest ABI v1, see docs/abi.md.
 *
 * Request:  {"action": "<name>", "data": <any JSON>}
 * Replies:
 *   process_data -> {"success":true,"result":{"processed":<data>},"error":null}
 *   get_status   -> {"success":true,"result":{"status":"running"},"error":null}
 *   other X      -> {"success":false,"result":null,"error":"Unknown action: X"}
 *   bad request  -> {"success":false,"result":null,"error":"invalid request: <reason>"}
 */
#include "sandbus.h"

/* {"success":false,"result":null,"error":"<prefix><detail>"} */
static uint64_t reply_error(const char *prefix, const char *detail, size_t detail_len)
{
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"success\":false,\"result\":null,\"error\":\"");
    sandbus_buf_json_chars(&b, prefix, strlen(prefix));
    sandbus_buf_json_chars(&b, detail, detail_len);
    sandbus_buf_cstr(&b, "\"}");
    return sandbus_buf_reply(&b);
}

static int action_is(const char *action, size_t len, const char *name)
{
    size_t n = strlen(name);
    return len == n && memcmp(action, name, n) == 0;
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    sandbus_json_value data;
    sandbus_buf b;
    char *action = NULL;
    size_t action_len = 0;
    uint64_t reply;
    int rc;

    {
        sandbus_buf line;
        sandbus_buf_init(&line);
        sandbus_buf_cstr(&line, "text_processor: request of ");
        sandbus_buf_u64(&line, len);
        sandbus_buf_cstr(&line, " bytes");
        if (!line.oom)
            sandbus_log_n(SANDBUS_LOG_DEBUG, line.data, line.len);
        sandbus_buf_free(&line);
    }

    rc = sandbus_json_get_string(in, len, "action", &action, &action_len);
    if (rc == SANDBUS_JSON_ENOTFOUND) {
        static const char msg[] = "missing \"action\"";
        return reply_error("invalid request: ", msg, sizeof msg - 1);
    }
    if (rc == SANDBUS_JSON_ETYPE) {
        static const char msg[] = "\"action\" must be a string";
        return reply_error("invalid request: ", msg, sizeof msg - 1);
    }
    if (rc != SANDBUS_JSON_OK) {
        const char *why = sandbus_json_strerror(rc);
        return reply_error("invalid request: ", why, strlen(why));
    }

    sandbus_buf_init(&b);
    if (action_is(action, action_len, "process_data")) {
        /* The document is valid here, so "data" is either found or absent. */
        sandbus_buf_cstr(&b, "{\"success\":true,\"result\":{\"processed\":");
        if (sandbus_json_get(in, len, "data", &data) == SANDBUS_JSON_OK)
            sandbus_buf_raw(&b, data.ptr, data.len);
        else
            sandbus_buf_cstr(&b, "null");
        sandbus_buf_cstr(&b, "},\"error\":null}");
        reply = sandbus_buf_reply(&b);
    } else if (action_is(action, action_len, "get_status")) {
        sandbus_buf_cstr(&b, "{\"success\":true,\"result\":{\"status\":\"running\"},\"error\":null}");
        reply = sandbus_buf_reply(&b);
    } else {
        reply = reply_error("Unknown action: ", action, action_len);
    }
    free(action);
    return reply;
}

/* Longest config excerpt logged: log output counts against a per-call cap. */
#define CONFIG_LOG_MAX 1024u

SANDBUS_EXPORT(sandbus_init)
int32_t sandbus_init(const uint8_t *config, uint32_t len)
{
    sandbus_buf line;
    uint32_t shown = len;
    if (shown > CONFIG_LOG_MAX) {
        /* Cut on a UTF-8 character boundary: the host rejects invalid UTF-8 logs. */
        shown = CONFIG_LOG_MAX;
        while (shown > 0 && (config[shown] & 0xC0) == 0x80)
            shown--;
    }
    sandbus_buf_init(&line);
    sandbus_buf_cstr(&line, "text_processor: init with config ");
    sandbus_buf_raw(&line, config, shown);
    if (shown < len) {
        sandbus_buf_cstr(&line, "... (");
        sandbus_buf_u64(&line, len);
        sandbus_buf_cstr(&line, " bytes)");
    }
    if (!line.oom)
        sandbus_log_n(SANDBUS_LOG_INFO, line.data, line.len);
    sandbus_buf_free(&line);
    return 0;
}

SANDBUS_EXPORT(sandbus_health)
int32_t sandbus_health(void)
{
    return 0;
}

SANDBUS_EXPORT(sandbus_shutdown)
void sandbus_shutdown(void)
{
    sandbus_log(SANDBUS_LOG_INFO, "text_processor: shutting down");
}
