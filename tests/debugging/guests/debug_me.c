/* A plugin to step through with gdb (tests/debugging/test_gdb.py, docs/guide.md).
 * Built with -g -O0: the comments "line:" mark the lines the test expects the debugger on. */
#include <stdio.h>

#include "sandbus.h"

static int add_one(int x) {
    int y = x + 1; /* line: add_one first */
    return y;      /* line: add_one next */
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len) {
    (void)in;
    int n = add_one((int)len + 19); /* line: caller */
    char out[32];
    int k = snprintf(out, sizeof out, "{\"n\":%d}", n);
    return sandbus_reply(out, (size_t)k);
}
