/* A C guest that touches files, the environment, the clock and randomness through
 * plain libc, as a real plugin would. Each function takes a JSON string (no escapes). */
#include "sandbus.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void arg(const uint8_t *in, uint32_t len, char *out, size_t cap)
{
    size_t n = 0;
    if (len >= 2 && in[0] == '"') {
        for (uint32_t i = 1; i + 1 < len && n + 1 < cap; i++)
            out[n++] = (char)in[i];
    }
    out[n] = 0;
}

static uint64_t reply_text(const char *key, const char *text, size_t n)
{
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"");
    sandbus_buf_cstr(&b, key);
    sandbus_buf_cstr(&b, "\":");
    if (text)
        sandbus_buf_json_string(&b, text, n);
    else
        sandbus_buf_cstr(&b, "null");
    sandbus_buf_cstr(&b, "}");
    return sandbus_buf_reply(&b);
}

SANDBUS_EXPORT(read_file)
uint64_t read_file(const uint8_t *in, uint32_t len)
{
    char path[512], data[4096];
    arg(in, len, path, sizeof path);
    FILE *f = fopen(path, "r");
    if (!f)
        return reply_text("error", "open failed", 11);
    size_t n = fread(data, 1, sizeof data, f);
    fclose(f);
    return reply_text("content", data, n);
}

SANDBUS_EXPORT(write_file)
uint64_t write_file(const uint8_t *in, uint32_t len)
{
    char path[512];
    arg(in, len, path, sizeof path);
    FILE *f = fopen(path, "w");
    if (!f)
        return reply_text("error", "open failed", 11);
    fputs("written by a plugin", f);
    fclose(f);
    return reply_text("written", path, strlen(path));
}

SANDBUS_EXPORT(libc_getenv)
uint64_t libc_getenv(const uint8_t *in, uint32_t len)
{
    char name[128];
    arg(in, len, name, sizeof name);
    const char *v = getenv(name);
    return reply_text("value", v, v ? strlen(v) : 0);
}

SANDBUS_EXPORT(host_getenv)
uint64_t host_getenv(const uint8_t *in, uint32_t len)
{
    char name[128], value[256];
    arg(in, len, name, sizeof name);
    int32_t n = sandbus_getenv(name, value, sizeof value);
    return reply_text("value", n < 0 ? NULL : value, n < 0 ? 0 : (size_t)n);
}

SANDBUS_EXPORT(clock_now)
uint64_t clock_now(const uint8_t *in, uint32_t len)
{
    (void)in; (void)len;
    char text[32];
    int n = snprintf(text, sizeof text, "%lld", (long long)time(NULL));
    return reply_text("now", text, (size_t)n);
}

SANDBUS_EXPORT(random_bytes)
uint64_t random_bytes(const uint8_t *in, uint32_t len)
{
    (void)in; (void)len;
    unsigned char r[8];
    if (getentropy(r, sizeof r) != 0)
        return reply_text("error", "getentropy failed", 17);
    char text[17];
    for (int i = 0; i < 8; i++)
        snprintf(text + 2 * i, 3, "%02x", r[i]);
    return reply_text("random", text, 16);
}

SANDBUS_EXPORT(print_lines)
uint64_t print_lines(const uint8_t *in, uint32_t len)
{
    (void)in; (void)len;
    for (int i = 0; i < 3; i++)
        printf("line %d\n", i);
    fflush(stdout);
    return reply_text("printed", "3", 1);
}
