/* Has a side effect, then overruns a short budget: appends its request body as one line to
 * /work/log.txt (its writable grant), then spins SPIN_MS of wall-clock time before replying.
 * A host that re-ran an interrupted call would append the line twice. */
#include <stdio.h>
#include "sandbus.h"

#ifndef SPIN_MS
#define SPIN_MS 60
#endif

static volatile uint64_t sink;

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    FILE *f = fopen("/work/log.txt", "a");
    if (!f)
        return sandbus_reply_str("{\"error\":\"open failed\"}");
    fwrite(in, 1, len, f);
    fputc('\n', f);
    fclose(f);
    int64_t start = sandbus_time_ms();
    while (sandbus_time_ms() - start < SPIN_MS)
        for (int i = 0; i < 20000; i++)
            sink += (uint64_t)i;
    return sandbus_reply_str("{\"appended\":true}");
}
