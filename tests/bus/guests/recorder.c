/* Records every message it handles by publishing it to "seen.<PLUGIN_NAME>"; fails on demand.
 * Compiled once per name with -DPLUGIN_NAME=... by tests/bus/conftest.py. */
#include "sandbus.h"

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "recorder"
#endif

static int contains(const uint8_t *in, uint32_t len, const char *needle)
{
    size_t n = strlen(needle);
    for (uint32_t i = 0; i + n <= len; i++)
        if (memcmp(in + i, needle, n) == 0)
            return 1;
    return 0;
}

SANDBUS_EXPORT(handle_message)
uint64_t handle_message(const uint8_t *in, uint32_t len)
{
    /* A payload asking to fail makes the call trap: the delivery is retried, then dead-lettered. */
    if (contains(in, len, "\"fail\":true"))
        __builtin_trap();
    sandbus_publish("seen." PLUGIN_NAME, in, len);
    return sandbus_reply_str("{\"ok\":true}");
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    /* {"topic": ...} requests publish their body to that topic: the permission test uses it. */
    if (contains(in, len, "\"forbidden\""))
        sandbus_publish("forbidden.topic", in, len);
    else
        sandbus_publish("seen." PLUGIN_NAME, in, len);
    return sandbus_reply_str("{\"published\":true}");
}
