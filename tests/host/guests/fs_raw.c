/* A hostile C guest calling wasi_snapshot_preview1 directly with the arguments it is given: one export,
 * "fs", takes a JSON string "op|a|b|..." (no escapes; numbers as strtoull reads them) and replies a JSON
 * string "e=<WASI errno> fd=<last fd> ...". See the ops below. */
#include "sandbus.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wasi/api.h>

static uint64_t reply(const char *text)
{
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_json_string(&b, text, strlen(text));
    return sandbus_buf_reply(&b);
}

/* Ops take '|'-separated fields; numbers are decimal (strtoull base 0). Replies "e=<errno> fd=<n> data". */
SANDBUS_EXPORT(fs)
uint64_t fs(const uint8_t *in, uint32_t len)
{
    static char buf[8192];
    char *f[10] = {0};
    size_t n = 0;
    if (len >= 2 && in[0] == '"')
        for (uint32_t i = 1; i + 1 < len && n + 1 < sizeof buf; i++)
            buf[n++] = (char)in[i];
    buf[n] = 0;
    int k = 0;
    f[k++] = buf;
    for (char *p = buf; *p && k < 10; p++)
        if (*p == '|') { *p = 0; f[k++] = p + 1; }
#define N(i) ((uint64_t)strtoull(f[i], NULL, 0))
    char out[4200];
    __wasi_errno_t e = 0;
    __wasi_fd_t fd = 0;
    out[0] = 0;
    if (!strcmp(f[0], "trap"))
        __builtin_trap();
    if (!strcmp(f[0], "open")) { /* open|dirfd|dirflags|oflags|rights|fdflags|path  then optionally write "X" */
        e = __wasi_path_open(N(1), N(2), f[6], N(3), N(4), 0, N(5), &fd);
        if (!e && (N(4) & __WASI_RIGHTS_FD_WRITE)) {
            __wasi_ciovec_t iov = {(const uint8_t *)"PWNED", 5};
            __wasi_size_t w;
            __wasi_errno_t e2 = __wasi_fd_write(fd, &iov, 1, &w);
            snprintf(out, sizeof out, "e=%d fd=%d we=%d", e, fd, e2);
            return reply(out);
        }
        if (!e && !(N(3) & __WASI_OFLAGS_DIRECTORY)) {
            __wasi_iovec_t iov = {(uint8_t *)out + 100, 200};
            __wasi_size_t r = 0;
            __wasi_errno_t e2 = __wasi_fd_read(fd, &iov, 1, &r);
            out[100 + r] = 0;
            char tmp[400];
            snprintf(tmp, sizeof tmp, "e=%d fd=%d re=%d data=%s", e, fd, e2, out + 100);
            return reply(tmp);
        }
    } else if (!strcmp(f[0], "openmany")) { /* openmany|dirfd|n: open "." n times, never closing */
        uint64_t i, n = N(2);
        for (i = 0; i < n; i++)
            if ((e = __wasi_path_open(N(1), 0, ".", __WASI_OFLAGS_DIRECTORY, __WASI_RIGHTS_FD_READDIR, 0, 0, &fd)))
                break;
    } else if (!strcmp(f[0], "print")) { /* print|text: to stdout and stderr */
        printf("%s\n", f[1]);
        fprintf(stderr, "%s\n", f[1]);
        fflush(stdout);
    } else if (!strcmp(f[0], "link")) { /* link|fd|flags|old|fd2|new */
        e = __wasi_path_link(N(1), N(2), f[3], N(4), f[5]);
    } else if (!strcmp(f[0], "rename")) { /* rename|fd|old|fd2|new */
        e = __wasi_path_rename(N(1), f[2], N(3), f[4]);
    } else if (!strcmp(f[0], "times")) { /* times|fd|flags|path */
        e = __wasi_path_filestat_set_times(N(1), N(2), f[3], 1000000000ull, 1000000000ull,
                                           __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_MTIM);
    } else if (!strcmp(f[0], "stat")) { /* stat|fd|flags|path */
        __wasi_filestat_t st;
        e = __wasi_path_filestat_get(N(1), N(2), f[3], &st);
        if (!e) { snprintf(out, sizeof out, "e=0 size=%llu ino=%llu", (unsigned long long)st.size, (unsigned long long)st.ino); return reply(out); }
    } else if (!strcmp(f[0], "symlink")) { /* symlink|target|fd|path */
        e = __wasi_path_symlink(f[1], N(2), f[3]);
    } else if (!strcmp(f[0], "mkdir")) {
        e = __wasi_path_create_directory(N(1), f[2]);
    } else if (!strcmp(f[0], "rmdir")) {
        e = __wasi_path_remove_directory(N(1), f[2]);
    } else if (!strcmp(f[0], "unlink")) {
        e = __wasi_path_unlink_file(N(1), f[2]);
    } else if (!strcmp(f[0], "close")) {
        e = __wasi_fd_close(N(1));
    } else if (!strcmp(f[0], "renumber")) {
        e = __wasi_fd_renumber(N(1), N(2));
    } else if (!strcmp(f[0], "readdir")) {
        static uint8_t d[4096];
        __wasi_size_t used = 0;
        e = __wasi_fd_readdir(N(1), d, sizeof d, 0, &used);
        size_t o = 0;
        for (size_t p = 0; !e && p + sizeof(__wasi_dirent_t) <= used;) {
            __wasi_dirent_t *de = (__wasi_dirent_t *)(d + p);
            p += sizeof(__wasi_dirent_t);
            if (p + de->d_namlen > used) break;
            if (o + de->d_namlen + 2 < sizeof out) { memcpy(out + o, d + p, de->d_namlen); o += de->d_namlen; out[o++] = '/'; out[o] = 0; }
            p += de->d_namlen;
        }
        char tmp[4300];
        snprintf(tmp, sizeof tmp, "e=%d %s", e, out);
        return reply(tmp);
    } else if (!strcmp(f[0], "prestat")) {
        __wasi_prestat_t ps;
        e = __wasi_fd_prestat_get(N(1), &ps);
        if (!e) {
            char name[256] = {0};
            (void)!__wasi_fd_prestat_dir_name(N(1), (uint8_t *)name,
                                              ps.u.dir.pr_name_len < 255 ? ps.u.dir.pr_name_len : 255);
            snprintf(out, sizeof out, "e=0 %s", name);
            return reply(out);
        }
    } else {
        return reply("unknown");
    }
    snprintf(out, sizeof out, "e=%d fd=%d", e, fd);
    return reply(out);
}
