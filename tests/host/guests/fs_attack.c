/* A hostile C guest for the filesystem grants: every way a plugin can change the tree under a grant,
 * or reach past it, through plain libc and raw WASI calls. One export, "fs", takes a JSON string
 * "op|a|b" (no escapes) and replies {"ok": <text>} or {"errno": <libc errno>}. */
#include "sandbus.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/api.h>

static uint64_t reply(const char *key, const char *text, size_t n)
{
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_cstr(&b, "{\"");
    sandbus_buf_cstr(&b, key);
    sandbus_buf_cstr(&b, "\":");
    sandbus_buf_json_string(&b, text, n);
    sandbus_buf_cstr(&b, "}");
    return sandbus_buf_reply(&b);
}

static uint64_t ok(const char *text) { return reply("ok", text, strlen(text)); }

static uint64_t fail(int e)
{
    char text[16];
    int n = snprintf(text, sizeof text, "%d", e);
    return reply("errno", text, (size_t)n);
}

static uint64_t check(int rc) { return rc == 0 ? ok("") : fail(errno); }

static uint64_t read_at(int dir, const char *path)
{
    char data[4096];
    int fd = dir < 0 ? open(path, O_RDONLY) : openat(dir, path, O_RDONLY);
    if (fd < 0)
        return fail(errno);
    ssize_t n = read(fd, data, sizeof data);
    close(fd);
    return n < 0 ? fail(errno) : reply("ok", data, (size_t)n);
}

static uint64_t write_at(int dir, const char *path)
{
    int fd = dir < 0 ? open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644)
                     : openat(dir, path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fail(errno);
    ssize_t n = write(fd, "written by a plugin", 19);
    close(fd);
    return n < 0 ? fail(errno) : ok(path);
}

static uint64_t list(const char *path)
{
    char names[4096];
    size_t n = 0;
    DIR *d = opendir(path);
    if (!d)
        return fail(errno);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (n + len + 2 >= sizeof names)
            break;
        memcpy(names + n, e->d_name, len);
        n += len;
        names[n++] = '/';
    }
    closedir(d);
    return reply("ok", names, n);
}

/* A directory descriptor the guest opened itself, as a raw WASI fd. */
static int open_dir(const char *path) { return open(path, O_RDONLY | O_DIRECTORY); }

SANDBUS_EXPORT(fs)
uint64_t fs(const uint8_t *in, uint32_t len)
{
    char buf[1024], *op = buf, *a = NULL, *b = NULL;
    size_t n = 0;
    if (len >= 2 && in[0] == '"')
        for (uint32_t i = 1; i + 1 < len && n + 1 < sizeof buf; i++)
            buf[n++] = (char)in[i];
    buf[n] = 0;
    if ((a = strchr(op, '|')) != NULL) {
        *a++ = 0;
        if ((b = strchr(a, '|')) != NULL)
            *b++ = 0;
    }
    if (!strcmp(op, "trap"))
        __builtin_trap();
    if (!strcmp(op, "read"))
        return read_at(-1, a);
    if (!strcmp(op, "write"))
        return write_at(-1, a);
    if (!strcmp(op, "list"))
        return list(a);
    if (!strcmp(op, "mkdir"))
        return check(mkdir(a, 0755));
    if (!strcmp(op, "rmdir"))
        return check(rmdir(a));
    if (!strcmp(op, "unlink"))
        return check(unlink(a));
    if (!strcmp(op, "rename"))
        return check(rename(a, b));
    if (!strcmp(op, "symlink")) /* symlink|target|link */
        return check(symlink(a, b));
    if (!strcmp(op, "link"))
        return check(link(a, b));
    if (!strcmp(op, "stat")) {
        struct stat st;
        return check(stat(a, &st));
    }
    if (!strcmp(op, "readlink")) {
        char target[512];
        ssize_t r = readlink(a, target, sizeof target);
        return r < 0 ? fail(errno) : reply("ok", target, (size_t)r);
    }
    /* Through a directory descriptor the guest opened itself: dirread|dir|path, dirwrite|dir|path. */
    if (!strcmp(op, "dirread") || !strcmp(op, "dirwrite") || !strcmp(op, "dirmkdir")) {
        int d = open_dir(a);
        if (d < 0)
            return fail(errno);
        uint64_t r = !strcmp(op, "dirread") ? read_at(d, b)
                     : !strcmp(op, "dirwrite") ? write_at(d, b) : check(mkdirat(d, b, 0755));
        close(d);
        return r;
    }
    /* renumber|dir|path: move a directory descriptor onto another open descriptor number (raw WASI
     * fd_renumber), then write through the new number. */
    if (!strcmp(op, "renumber")) {
        int d = open_dir(a), other = open_dir(a);
        if (d < 0 || other < 0)
            return fail(errno);
        __wasi_errno_t e = __wasi_fd_renumber((__wasi_fd_t)d, (__wasi_fd_t)other);
        if (e != 0)
            return fail(e);
        uint64_t r = write_at(other, b);
        close(other);
        return r;
    }
    /* rawopen|fd|path: path_open relative to a raw descriptor number (e.g. a preopen), for reading. */
    if (!strcmp(op, "rawopen")) {
        __wasi_fd_t out;
        __wasi_errno_t e = __wasi_path_open((__wasi_fd_t)atoi(a), 0, b, 0, __WASI_RIGHTS_FD_READ, 0, 0, &out);
        if (e != 0)
            return fail(e);
        (void)!__wasi_fd_close(out);
        return ok("opened");
    }
    /* rawlong|n: path_open of an n-byte path on the decoy "/" (raw WASI); replies the WASI errno. */
    if (!strcmp(op, "rawlong")) {
        size_t size = (size_t)atoi(a);
        char *path = malloc(size + 1);
        if (!path)
            return fail(ENOMEM);
        memset(path, 'a', size);
        path[size] = 0; /* the libc wrapper passes strlen(path) as the length */
        __wasi_fd_t out;
        __wasi_errno_t e = __wasi_path_open(3, 0, path, 0, __WASI_RIGHTS_FD_READ, 0, 0, &out);
        free(path);
        return fail(e);
    }
    /* rawrenumber|from|to: renumber two raw descriptors (e.g. the preopens). */
    if (!strcmp(op, "rawrenumber")) {
        __wasi_errno_t e = __wasi_fd_renumber((__wasi_fd_t)atoi(a), (__wasi_fd_t)atoi(b));
        return e != 0 ? fail(e) : ok("");
    }
    /* fdwrite|path|how: open a file or directory for reading only, then write to it through the
     * descriptor (how: write, pwrite, truncate, allocate, times); replies the WASI errno. */
    if (!strcmp(op, "fdwrite")) {
        __wasi_errno_t e;
        int fd = open(a, O_RDONLY);
        if (fd < 0)
            return fail(errno);
        __wasi_ciovec_t iov = {(const uint8_t *)"x", 1};
        __wasi_size_t n;
        if (!strcmp(b, "write"))
            e = __wasi_fd_write((__wasi_fd_t)fd, &iov, 1, &n);
        else if (!strcmp(b, "pwrite"))
            e = __wasi_fd_pwrite((__wasi_fd_t)fd, &iov, 1, 0, &n);
        else if (!strcmp(b, "truncate"))
            e = __wasi_fd_filestat_set_size((__wasi_fd_t)fd, 0);
        else if (!strcmp(b, "allocate"))
            e = __wasi_fd_allocate((__wasi_fd_t)fd, 0, 100);
        else
            e = __wasi_fd_filestat_set_times((__wasi_fd_t)fd, 1, 1, __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_MTIM);
        close(fd);
        return e != 0 ? fail(e) : ok("");
    }
    return reply("error", "unknown op", 10);
}
