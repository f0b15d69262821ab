/*
 * order_logger - the topic example: subscribed to orders.* (see order_logger.toml), it logs every
 * order it receives. `sandbus pub orders.created '{"id": 42}'` reaches it once, whichever nodes
 * serve it; `sandbus ls` counts its executions. Needs nothing but compute.
 */
#include "sandbus.h"

/* The node hands topic messages to handle_message as a PluginMessage envelope:
 * {"id":..., "from":..., "topic":"orders.created", "payload":{...}, ...} */
SANDBUS_EXPORT(handle_message)
uint64_t handle_message(const uint8_t *in, uint32_t len)
{
    sandbus_buf line;
    sandbus_buf_init(&line);
    sandbus_buf_cstr(&line, "order message: ");
    sandbus_buf_raw(&line, in, len > 512 ? 512 : len);
    sandbus_log_n(SANDBUS_LOG_INFO, line.data, line.len);
    sandbus_buf_free(&line);
    return sandbus_reply_str("{\"success\":true,\"result\":null,\"error\":null}");
}

/* Direct calls answer what this plugin does. */
SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    return sandbus_reply_str("{\"success\":true,\"result\":{\"subscribed\":[\"orders.*\"]},\"error\":null}");
}
