/* A plugin whose outcome depends on the clock and on random bytes, for the record and replay tests
 * (tests/debugging/test_record_replay.py): it reads the time three ways (the sandbus_v1 host function,
 * WASI's realtime and monotonic clocks) and eight random bytes (WASI random_get), draws a number in
 * [0, 100) from them, logs it, and traps when it is below the threshold given as input (a JSON number). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "sandbus.h"

static void check_draw(int draw, int threshold) {
    if (draw < threshold) /* line: trap */
        __builtin_trap();
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len) {
    char text[16] = {0};
    memcpy(text, in, len < sizeof text - 1 ? len : sizeof text - 1);
    int threshold = atoi(text);
    int64_t host_ms = sandbus_time_ms();
    struct timespec wall, mono;
    clock_gettime(CLOCK_REALTIME, &wall);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    uint64_t noise = 0;
    if (getentropy(&noise, sizeof noise) != 0)
        return sandbus_reply_str("{\"error\":\"no entropy\"}");
    uint64_t mixed = noise ^ (uint64_t)host_ms ^ (uint64_t)wall.tv_nsec ^ (uint64_t)mono.tv_nsec;
    int draw = (int)(mixed % 100);
    char line[64];
    snprintf(line, sizeof line, "drew %d", draw);
    sandbus_log(SANDBUS_LOG_INFO, line);
    check_draw(draw, threshold);
    char out[128];
    int k = snprintf(out, sizeof out, "{\"draw\":%d,\"noise\":\"%016llx\",\"wall_ns\":%ld}", draw,
                     (unsigned long long)noise, (long)wall.tv_nsec);
    return sandbus_reply(out, (size_t)k);
}
