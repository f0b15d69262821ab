/* Chains that never end by themselves (tests/bus/test_hardening_hostfuncs.py).
 *
 * -DSELF_LOOP ("selfloop", subscribed to loop.t): handle_request and handle_message publish onto loop.t,
 *   the topic it is subscribed to.
 * otherwise ("cycler", subscribed to cyc.t): handle_request publishes onto cyc.t; handle_message requests
 *   cycler.handle_request: request -> publish -> request ...
 */
#include "sandbus.h"

#ifdef SELF_LOOP
#define TOPIC "loop.t"
#else
#define TOPIC "cyc.t"
#endif

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    sandbus_publish(TOPIC, "{\"again\":true}", 14);
    return sandbus_reply_str("{\"published\":true}");
}

SANDBUS_EXPORT(handle_message)
uint64_t handle_message(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
#ifdef SELF_LOOP
    sandbus_publish(TOPIC, "{\"again\":true}", 14);
#else
    char *body = NULL;
    size_t body_len = 0;
    sandbus_request("cycler.handle_request", "{}", 2, &body, &body_len);
    free(body);
#endif
    return sandbus_reply_str("{\"ok\":true}");
}
