/* fabric CNI plugin, compiled front (cni/install.py builds it at `fabricctl cni install`).
 *
 * It does only the common path: connect to fabricd's socket, send the request framed as
 * cni/shim.py frames it (cni/protocol.py), print the answer, exit with its code. Everything
 * else goes to the Python plugin (cni/shim.py, installed at FABRIC_FALLBACK) by exec, so the
 * rules live in one place:
 *   - VERSION, an unknown or missing CNI_COMMAND, fabricd not accepting the connection:
 *     exec'd before stdin is read (it reads stdin itself);
 *   - fabricd gone after the request left, no answer within REPLY_TIMEOUT_MS, a malformed
 *     answer: stdin is handed over in a memfd and FABRIC_CNI_FRONT_FAILED says why, so the
 *     Python plugin answers (error 11/50, or the DEL recorded) without sending the request
 *     a second time.
 * Why: a Python plugin spends ~7-9 ms of a ~17 ms ADD starting its interpreter; this starts
 * in well under 1 ms (docs/bench.md, cni). Built from fabric_front_config.h, which the
 * installer writes: FABRIC_SOCKET, FABRIC_PLUGIN, FABRIC_FALLBACK, FABRIC_BROKEN (C string
 * literals; the last the error printed when FABRIC_FALLBACK cannot be exec'd).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fabric_front_config.h"

/* fabric_front_config.h, written by cni/install.py build_front(), defines the socket, the
 * plugin's name, the Python fallback and, from cni/protocol.py and cni/shim.py (one source):
 * MAGIC, MAX_STDIN (larger: fabricd is told with flag 1, as the shim does), MAX_REPLY and
 * REPLY_TIMEOUT_MS (the shim's REPLY_TIMEOUT; tests build a shorter one). */
#if !defined(MAGIC) || !defined(MAX_STDIN) || !defined(MAX_REPLY) || !defined(REPLY_TIMEOUT_MS)
#error "fabric_front_config.h is incomplete: build the front with `fabricctl cni install`"
#endif

extern char **environ;

static const char *const VERBS[] = {"ADD", "DEL", "CHECK", "GC", "STATUS", NULL};

/* Run the Python plugin in this process; never returns. */
static void fallback(void) {
    char *argv[] = {(char *)FABRIC_FALLBACK, NULL};
    execv(FABRIC_FALLBACK, argv);
    static const char msg[] = FABRIC_BROKEN; /* a CNI error document, written by the installer */
    ssize_t ignored = write(1, msg, sizeof msg - 1);
    (void)ignored;
    _exit(1);
}

/* Hand stdin (already read) and the reason to the Python plugin; never returns. */
static void fallback_failed(const char *why, const char *in, size_t n, int too_large) {
    int fd = memfd_create("fabric-cni-stdin", 0);
    if (fd >= 0) {
        size_t off = 0;
        while (off < n) {
            ssize_t w = write(fd, in + off, n - off);
            if (w <= 0) break;
            off += (size_t)w;
        }
        lseek(fd, 0, SEEK_SET);
        dup2(fd, 0);
        close(fd);
    }
    setenv("FABRIC_CNI_FRONT_FAILED", why, 1);
    if (too_large) setenv("FABRIC_CNI_FRONT_TOO_LARGE", "1", 1);
    fallback();
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for events before the deadline: 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, int64_t deadline) {
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, (int)left);
        if (r > 0) return 1;
        if (r == 0) return 0;
        if (errno != EINTR) return -1;
    }
}

static void put32(char *p, uint32_t v) {
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int main(void) {
    const char *command = getenv("CNI_COMMAND");
    int known = 0;
    for (int i = 0; command && VERBS[i]; i++) known |= strcmp(command, VERBS[i]) == 0;
    if (!known) fallback();

    const char *path = getenv("FABRIC_CNI_SOCKET");
    if (!path || !*path) path = FABRIC_SOCKET;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) fallback();
    strcpy(addr.sun_path, path);
    /* non-blocking: a fabricd whose backlog is full refuses at once (EAGAIN) instead of
     * holding the runtime, and the Python plugin's own connect (1 s timeout) answers */
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) fallback();
    signal(SIGPIPE, SIG_IGN); /* a closed stdout is an error return, as in Python */

    /* stdin, up to MAX_STDIN (beyond: not read to its end, sent empty with flag 1) */
    size_t cap = 1 << 16, n = 0;
    char *in = malloc(cap);
    int too_large = 0;
    for (;;) {
        if (n == cap) {
            cap *= 2;
            in = realloc(in, cap);
        }
        if (!in) fallback_failed("out of memory", "", 0, 0);
        ssize_t r = read(0, in + n, cap - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
        if (n > MAX_STDIN) {
            too_large = 1;
            n = 0;
            break;
        }
    }

    /* the request: MAGIC, flag, len(env) BE32, len(stdin) BE32, env (CNI_* \0-joined), stdin */
    size_t blob = 0;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "CNI_", 4) == 0) blob += strlen(*e) + 1;
    static const char plugin_var[] = "FABRIC_CNI_PLUGIN=" FABRIC_PLUGIN;
    blob += sizeof plugin_var - 1;
    size_t total = 13 + blob + n;
    char *req = malloc(total);
    if (!req) fallback_failed("out of memory", in, n, too_large);
    memcpy(req, MAGIC, 4);
    req[4] = (char)(too_large ? 1 : 0);
    put32(req + 5, (uint32_t)blob);
    put32(req + 9, (uint32_t)n);
    char *p = req + 13;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "CNI_", 4) != 0) continue;
        size_t l = strlen(*e);
        memcpy(p, *e, l);
        p += l;
        *p++ = '\0';
    }
    memcpy(p, plugin_var, sizeof plugin_var - 1);
    p += sizeof plugin_var - 1;
    memcpy(p, in, n);

    int64_t deadline = now_ms() + REPLY_TIMEOUT_MS;
    for (size_t off = 0; off < total;) {
        if (wait_fd(s, POLLOUT, deadline) <= 0)
            fallback_failed("no answer in time", in, n, too_large);
        ssize_t w = send(s, req + off, total - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (w < 0) fallback_failed(strerror(errno), in, n, too_large);
        off += (size_t)w;
    }

    /* the answer: MAGIC, exit code, len BE32, stdout */
    unsigned char head[9];
    size_t got = 0, need = 9;
    char *out = NULL;
    while (got < need) {
        int ready = wait_fd(s, POLLIN, deadline);
        if (ready == 0) fallback_failed("no answer in time", in, n, too_large);
        if (ready < 0) fallback_failed(strerror(errno), in, n, too_large);
        char *dst = got < 9 ? (char *)head + got : out + (got - 9);
        size_t room = got < 9 ? 9 - got : need - got;
        ssize_t r = recv(s, dst, room, MSG_DONTWAIT);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (r < 0) fallback_failed(strerror(errno), in, n, too_large);
        if (r == 0)
            fallback_failed("fabricd closed the connection without an answer", in, n, too_large);
        got += (size_t)r;
        if (got == 9 && need == 9) {
            if (memcmp(head, MAGIC, 4) != 0)
                fallback_failed("not a fabricd answer", in, n, too_large);
            uint32_t len = get32(head + 5);
            need = 9 + (len < MAX_REPLY ? len : MAX_REPLY);
            out = malloc(need - 9 + 1);
            if (!out) fallback_failed("out of memory", in, n, too_large);
        }
    }
    for (size_t off = 0; off < need - 9;) {
        ssize_t w = write(1, out + off, need - 9 - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (size_t)w;
    }
    _exit(head[4]);
}
