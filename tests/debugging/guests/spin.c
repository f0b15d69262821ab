/* A plugin that reads the host clock once, then counts: for as many steps as its input (a JSON number)
 * says, or forever when the input is negative. For the record and replay tests of limits
 * (tests/debugging/test_record_hostile.py): out of fuel, timeouts. */
#include <stdlib.h>

#include "sandbus.h"

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len) {
    char text[24] = {0};
    memcpy(text, in, len < sizeof text - 1 ? len : sizeof text - 1);
    long long steps = atoll(text);
    volatile int64_t now = sandbus_time_ms();
    volatile unsigned long long counted = 0;
    while (steps < 0 || counted < (unsigned long long)steps)
        counted = counted + (unsigned long long)(now & 1) + 1;
    return sandbus_reply_str("{\"done\":true}");
}
