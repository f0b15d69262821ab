/* Compute only, slow to build, traps on demand: its constructor (run by _initialize) burns
 * SLOW_INIT_MS of wall-clock time, and a request whose body is `true` traps. Every trap makes the
 * node build a new instance, so each one costs the host SLOW_INIT_MS of guest code. */
#include "sandbus.h"

#ifndef SLOW_INIT_MS
#define SLOW_INIT_MS 1500
#endif

static volatile uint64_t sink;

__attribute__((constructor)) static void burn(void)
{
    int64_t start = sandbus_time_ms();
    while (sandbus_time_ms() - start < SLOW_INIT_MS) {
        /* Ask the clock now and then only: the guest spins in wasm, not in host calls. */
        for (int i = 0; i < 200000; i++)
            sink += (uint64_t)i;
    }
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    if (len == 4 && memcmp(in, "true", 4) == 0)
        __builtin_trap();
    return sandbus_reply((const char *)in, len);
}
