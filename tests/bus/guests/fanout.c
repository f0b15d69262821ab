/* Fans out (tests/bus/test_hardening_hostfuncs.py): a plugin subscribed to fan.t that publishes
 * FANOUT (default 3) messages onto fan.t for every message it handles, so one request would grow into
 * K + K^2 + ... + K^hops messages if nothing bounded how wide a chain spreads.
 *
 *   handle_request {"n": N}   publishes N messages onto fan.t in this one call (N = 0: FANOUT)
 *   handle_message            publishes FANOUT messages onto fan.t
 *   ping                      publishes nothing: {"pong": true}
 */
#include "sandbus.h"
#include <stdlib.h>

#ifndef FANOUT
#define FANOUT 3
#endif

static void publish_n(long long n)
{
    for (long long i = 0; i < n; i++)
        sandbus_publish("fan.t", "{\"again\":true}", 14); /* a refused send ends the call (a trap) */
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    sandbus_json_value v;
    long long n = FANOUT;
    if (sandbus_json_get(in, len, "n", &v) == SANDBUS_JSON_OK)
        n = strtoll((const char *)v.ptr, NULL, 10);
    publish_n(n);
    return sandbus_reply_str("{\"published\":true}");
}

SANDBUS_EXPORT(handle_message)
uint64_t handle_message(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    publish_n(FANOUT);
    return sandbus_reply_str("{\"ok\":true}");
}

SANDBUS_EXPORT(ping)
uint64_t ping(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    return sandbus_reply_str("{\"pong\":true}");
}
