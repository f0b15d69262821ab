/* A plugin whose outcome depends on what earlier calls left in its memory: it counts its calls and
 * traps on the second (tests/debugging/test_record_hostile.py: a record says how many calls its
 * instance had served, which a replay from a fresh instance cannot reproduce). */
#include "sandbus.h"

static int calls;

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len) {
    (void)in;
    (void)len;
    calls++;
    if (calls >= 2)
        __builtin_trap();
    return sandbus_reply_str("{\"first\":true}");
}
