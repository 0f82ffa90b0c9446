/*
 * loadgen: closed-loop TCP echo load generator for the threadserve benchmarks.
 *
 * One thread, one epoll set, non-blocking sockets. Every connection keeps
 * exactly one request in flight (closed loop): it writes SIZE bytes, reads the
 * echo back, checks every byte against the pattern it sent, records the
 * latency, then sends the next request. A single thread is enough because the
 * harness pins this process to its own core; a second thread on the same core
 * would only add contention.
 *
 * Every mode first connects CONNS connections (at most --inflight handshakes
 * at a time) and makes one round trip on each, with no other load running.
 * Modes:
 *   echo    then load all, warm up, measure for DURATION seconds, print JSON.
 *   hold    connect CONNS, one round trip on each, print a "ready" JSON line,
 *           then wait for a command on stdin (idle connections).
 *   active  like echo, but after warm-up print "ready" and keep the load on
 *           while waiting for a command on stdin.
 * Commands (hold/active): "stop" means the harness is about to stop the server:
 * from now on the end of every connection is classified (notice, EOF, reset)
 * until all have ended or OBSERVE seconds have passed. "quit" or EOF on stdin
 * closes everything. Either way one final JSON object is printed on stdout.
 *
 * Short connections (echo mode, --short N): N more client slots, each in a
 * loop of connect, one SHORT_SIZE echo (checked byte for byte), shutdown of
 * its write side, and the server's EOF, then close and the next connect. The
 * time from connect() to that EOF is the connection's latency; connections
 * that end in the measured window are counted. They start with the warm-up,
 * after the CONNS busy connections are up, so `--conns 0 --short 10` is the
 * short-connection workload and `--conns 50 --size 512 --short 50` the mixed
 * one.
 *
 * The measured window is also cut into --slice second slices, and the
 * requests (and short connections) completed in each are printed, so a run
 * that was still speeding up or slowing down can be told from a steady one.
 *
 * Everything is bounded: connecting by --connect-timeout, measuring by
 * --duration and --max-requests, waiting for a command by --hold-timeout, and
 * observing a stop by --observe-timeout.
 *
 * Only loopback destinations are accepted (127.0.0.0/8).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 1024
#define STDIN_TAG UINT32_MAX
#define NOTICE_MAX 64
/* Every pattern byte is a lowercase letter, so a capital 'S' where an echo
 * byte was expected can only be the start of the server's "Shutting down!". */
#define NOTICE_TEXT "Shutting down!"

enum mode { MODE_ECHO, MODE_HOLD, MODE_ACTIVE };
enum phase { PH_CONNECT, PH_WARMUP, PH_MEASURE, PH_WAIT, PH_STOP, PH_DONE };
enum cstate { C_UNUSED, C_CONNECTING, C_OPEN, C_IDLE, C_CLOSED };
enum end { END_NONE, END_EOF, END_RESET, END_ERROR };
enum kind { K_BUSY, K_SHORT };
#define MAX_SLICES 1024

struct conn {
    int fd;
    enum cstate state;
    uint32_t seq;       /* request number, feeds the byte pattern */
    uint32_t sent;      /* bytes of the current request written */
    uint32_t verified;  /* bytes of the current echo checked */
    int in_flight;      /* a request is outstanding */
    int want_out;       /* EPOLLOUT currently registered */
    int first_done;     /* first round trip completed */
    uint32_t window_done; /* requests completed in the measured window */
    uint64_t t_start;   /* ns, when the current request was first written */
    enum kind kind;     /* a busy (long-lived) connection or a short-connection slot */
    uint32_t size;      /* request size of this connection */
    int half_closed;    /* short: echo checked, our FIN sent, waiting for the server's */
    uint64_t t_open;    /* short: ns, when connect() was called */
    enum end end;
    int notice_len;
    char notice[NOTICE_MAX];
};

/* Log-linear latency histogram: exact below 128 ns, then 64 sub-buckets per
 * power of two (under 1.6% error), so p99.9 stays meaningful at any rate
 * without storing every sample. */
#define HIST_BUCKETS (64 * 64 + 128)
struct hist {
    uint64_t bucket[HIST_BUCKETS];
    uint64_t count, max;
    double sum;
};
static struct hist req_hist;   /* busy connections: one request's round trip */
static struct hist short_hist; /* short connections: connect() to the server's EOF */

static int hist_index(uint64_t v) {
    if (v < 128) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 6;
    int idx = shift * 64 + (int)(v >> shift);
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

static double hist_value(int idx) {
    if (idx < 128) return idx;
    int shift = idx / 64 - 1;
    uint64_t m = (uint64_t)(idx - shift * 64);
    return (double)(m << shift) + (double)(1ULL << shift) / 2.0;
}

static void hist_add(struct hist *h, uint64_t v) {
    h->bucket[hist_index(v)]++;
    h->count++;
    h->sum += (double)v;
    if (v > h->max) h->max = v;
}

static double hist_percentile(const struct hist *h, double p) {
    if (h->count == 0) return 0;
    uint64_t rank = (uint64_t)(p * (double)h->count + 0.999999);
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += h->bucket[i];
        if (seen >= rank) return hist_value(i);
    }
    return (double)h->max;
}

/* One JSON object of latency percentiles, in microseconds. */
static void hist_print(const struct hist *h) {
    printf("{\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"p999\": %.3f, "
           "\"max\": %.3f, \"mean\": %.3f}",
           hist_percentile(h, 0.5) / 1e3, hist_percentile(h, 0.9) / 1e3,
           hist_percentile(h, 0.99) / 1e3, hist_percentile(h, 0.999) / 1e3,
           (double)h->max / 1e3, h->count ? h->sum / (double)h->count / 1e3 : 0.0);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static double cpu_self(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* CPU seconds (user + system, all threads) of another process, read from
 * /proc so the window matches ours exactly; -1 when unknown. */
static double cpu_of(int pid) {
    if (pid <= 0) return -1;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may contain spaces */
    if (!p) return -1;
    unsigned long long ut = 0, st = 0;
    /* after ')': state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* The request pattern is a window into one long run of 'a'..'z', so filling
 * a request is a memcpy and checking an echo is a memcmp: per-byte arithmetic
 * made the generator the bottleneck at 1 KiB. */
static char pattern[26 + 65536];

static void pattern_init(void) {
    for (size_t i = 0; i < sizeof pattern; i++) pattern[i] = (char)('a' + i % 26);
}

static const char *pattern_for(uint32_t c, uint32_t seq) {
    return pattern + (c * 7u + seq * 13u) % 26u;
}

/* ---- configuration and global state ---- */

static enum mode mode = MODE_ECHO;
static const char *host = "127.0.0.1";
static int port = 0, nconns = 1, msg_size = 64, server_pid = 0, inflight_max = 128;
static int nshort = 0, short_size = 64, nslots = 1, stride = 64;
static double warmup_s = 1, duration_s = 5, connect_timeout_s = 60, hold_timeout_s = 300,
              observe_timeout_s = 30, slice_s = 1;
static uint64_t max_requests = 1000000000ULL;

static struct conn *conns;
static char *sendbuf; /* one request buffer per connection, regenerated per request */
static int epfd;
static struct sockaddr_in dest;
static enum phase phase = PH_CONNECT;
static int opened, connected, ready, connecting_or_first, closed_count;
static uint64_t connect_failures, connect_retries;
static uint64_t err_mismatch, err_eof, err_reset, err_other, err_unsolicited;
static uint64_t window_requests, window_bytes, total_requests;
static uint64_t stop_echoes, stop_unanswered, stop_partial;
static uint64_t stop_reset_on_send; /* the reset surfaced on a write, not a read */
static uint64_t t_begin, t_connected, t_ready, t_window_start, t_window_end, t_stop, t_last_end;
static uint64_t short_window, short_started, short_connect_failures;
static uint64_t slice_requests[MAX_SLICES], slice_short[MAX_SLICES];
static double cpu_client_start, cpu_client_end, cpu_server_start, cpu_server_end;

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void ep_mod(struct conn *c, int idx, int want_out) {
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.u32 = (uint32_t)idx};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->want_out = want_out;
}

static void open_one(int idx);

static int running(void) { return phase == PH_WARMUP || phase == PH_MEASURE; }

/* Short-connection slots whose connection ended, to be opened again once the
 * current batch of events is handled: a later event in the same batch may be
 * for the old socket, and must not be taken for the new one's. */
static int *reopen_queue;
static int reopen_count;

static void reopen_later(int idx) {
    if (running()) reopen_queue[reopen_count++] = idx;
}

static void reopen_pending(void) {
    for (int i = 0; i < reopen_count; i++)
        if (running()) open_one(reopen_queue[i]);
    reopen_count = 0;
}

static int slice_of(uint64_t t) {
    uint64_t i = (t - t_window_start) / (uint64_t)(slice_s * 1e9);
    return i < MAX_SLICES ? (int)i : MAX_SLICES - 1;
}

static void conn_end(int idx, enum end how) {
    struct conn *c = &conns[idx];
    if (c->state == C_CLOSED || c->state == C_UNUSED) return;
    if (c->kind == K_SHORT) {
        /* A short connection that ends any other way than by the server's
         * EOF after its echo is an error; the slot goes on with a new one. */
        if (how == END_EOF) err_eof++;
        else if (how == END_RESET) err_reset++;
        else err_other++;
        close(c->fd);
        c->fd = -1;
        c->state = C_CLOSED;
        reopen_later(idx);
        return;
    }
    if (phase == PH_STOP) {
        c->end = how;
        if (c->in_flight) stop_unanswered++;
        if (c->in_flight && c->verified > 0) stop_partial++;
        t_last_end = now_ns();
    } else if (how == END_EOF) {
        err_eof++;
    } else if (how == END_RESET) {
        err_reset++;
    } else {
        err_other++;
    }
    if (c->state == C_CONNECTING || !c->first_done) connecting_or_first--;
    close(c->fd);
    c->fd = -1;
    c->state = C_CLOSED;
    closed_count++;
}

static void fill_request(int idx) {
    struct conn *c = &conns[idx];
    memcpy(sendbuf + (size_t)idx * (size_t)stride, pattern_for((uint32_t)idx, c->seq),
           (size_t)c->size);
}

static void drain_before_reset(int idx);

/* Write as much of the current request as the socket takes. */
static void pump_send(int idx) {
    struct conn *c = &conns[idx];
    const char *b = sendbuf + (size_t)idx * (size_t)stride;
    while (c->sent < c->size) {
        ssize_t n = send(c->fd, b + c->sent, (size_t)c->size - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (uint32_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) ep_mod(c, idx, 1);
            return;
        }
        if (n < 0 && errno == EINTR) continue;
        int err = errno;
        /* Bytes that arrived before the reset (the last echoes, a goodbye
         * notice) are still readable on Linux: take them before judging. */
        drain_before_reset(idx);
        if (phase == PH_STOP) stop_reset_on_send++;
        conn_end(idx, (err == EPIPE || err == ECONNRESET) ? END_RESET : END_ERROR);
        return;
    }
    if (c->want_out) ep_mod(c, idx, 0);
}

static void start_request(int idx) {
    struct conn *c = &conns[idx];
    if (total_requests >= max_requests) return; /* count bound: go quiet */
    fill_request(idx);
    c->sent = 0;
    c->verified = 0;
    c->in_flight = 1;
    total_requests++;
    c->t_start = now_ns();
    pump_send(idx);
}

/* A short connection's echo is checked: send our FIN and wait for the
 * server's. Its latency is taken when that EOF arrives (short_done). */
static void short_echoed(int idx) {
    struct conn *c = &conns[idx];
    c->in_flight = 0;
    c->seq++;
    c->half_closed = 1;
    if (shutdown(c->fd, SHUT_WR) < 0) conn_end(idx, END_ERROR);
}

static void short_done(int idx, uint64_t t) {
    struct conn *c = &conns[idx];
    if (phase == PH_MEASURE) {
        hist_add(&short_hist, t - c->t_open);
        short_window++;
        slice_short[slice_of(t)]++;
    }
    close(c->fd);
    c->fd = -1;
    c->state = C_CLOSED;
    reopen_later(idx);
}

static void on_echo_complete(int idx, uint64_t t) {
    struct conn *c = &conns[idx];
    if (c->kind == K_SHORT) {
        short_echoed(idx);
        return;
    }
    c->in_flight = 0;
    c->seq++;
    if (phase == PH_MEASURE) {
        hist_add(&req_hist, t - c->t_start);
        window_requests++;
        window_bytes += (uint64_t)c->size;
        slice_requests[slice_of(t)]++;
    } else if (phase == PH_STOP) {
        stop_echoes++;
    }
    if (phase == PH_MEASURE) c->window_done++;
    if (!c->first_done) {
        /* The first round trip proves the server accepted the connection.
         * Until every connection has had it, the load stays off: otherwise
         * a server busy echoing on early connections would never get round
         * to accepting the rest, and the run would measure that instead. */
        c->first_done = 1;
        ready++;
        connecting_or_first--;
        if (mode == MODE_HOLD || phase == PH_CONNECT) {
            c->state = C_IDLE;
            return;
        }
    }
    if (mode == MODE_HOLD || phase == PH_DONE) return;
    start_request(idx);
}

/* Check received bytes against what this connection is owed. */
static void consume(int idx, const char *buf, ssize_t n, uint64_t t) {
    struct conn *c = &conns[idx];
    ssize_t i = 0;
    while (i < n) {
        if (c->state == C_CLOSED) return;
        if (c->notice_len > 0) {
            while (i < n && c->notice_len < NOTICE_MAX) c->notice[c->notice_len++] = buf[i++];
            return;
        }
        if (c->in_flight && c->verified < c->sent) {
            const char *want = pattern_for((uint32_t)idx, c->seq) + c->verified;
            ssize_t span = (ssize_t)(c->sent - c->verified);
            if (span > n - i) span = n - i;
            ssize_t ok = 0;
            if (memcmp(buf + i, want, (size_t)span) == 0) {
                ok = span;
            } else {
                while (ok < span && buf[i + ok] == want[ok]) ok++;
            }
            c->verified += (uint32_t)ok;
            i += ok;
            if (c->verified == c->size) on_echo_complete(idx, t);
            if (ok == span) continue;
        }
        if (phase == PH_STOP && buf[i] == 'S') {
            c->notice[0] = buf[i++];
            c->notice_len = 1;
            continue;
        }
        if (c->in_flight)
            err_mismatch++;
        else
            err_unsolicited++;
        conn_end(idx, END_ERROR);
        return;
    }
}

static void on_readable(int idx) {
    static char buf[65536];
    struct conn *c = &conns[idx];
    for (int rounds = 0; rounds < 4 && c->state != C_CLOSED; rounds++) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) {
            consume(idx, buf, n, now_ns());
            if ((size_t)n < sizeof buf) return;
            continue;
        }
        if (n == 0) {
            if (c->kind == K_SHORT && c->half_closed)
                short_done(idx, now_ns());
            else
                conn_end(idx, END_EOF);
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        conn_end(idx, errno == ECONNRESET ? END_RESET : END_ERROR);
        return;
    }
}

static void drain_before_reset(int idx) {
    static char buf[65536];
    for (int rounds = 0; rounds < 16 && conns[idx].state != C_CLOSED; rounds++) {
        ssize_t n = recv(conns[idx].fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n <= 0) return;
        consume(idx, buf, n, now_ns());
    }
}

static void open_one(int idx) {
    struct conn *c = &conns[idx];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = C_CONNECTING;
    c->want_out = 1;
    if (c->kind == K_SHORT) {
        c->half_closed = 0;
        c->in_flight = 0;
        c->sent = 0;
        c->verified = 0;
        c->t_open = now_ns();
        short_started++;
    } else {
        connecting_or_first++;
    }
    int r = connect(fd, (struct sockaddr *)&dest, sizeof dest);
    if (r < 0 && errno != EINPROGRESS) die("connect");
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
}

static void on_connected(int idx) {
    struct conn *c = &conns[idx];
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0 && c->kind == K_SHORT) {
        short_connect_failures++;
        conn_end(idx, END_ERROR);
        return;
    }
    if (err != 0 && phase != PH_CONNECT) {
        connect_failures++;
        conn_end(idx, END_ERROR);
        return;
    }
    if (err != 0) {
        /* A full accept queue or a transient refusal: retry the same slot
         * until the connect deadline rather than giving up on it. */
        connect_failures++;
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        connecting_or_first--;
        c->state = C_UNUSED;
        connect_retries++;
        open_one(idx);
        return;
    }
    c->state = C_OPEN;
    if (c->kind == K_BUSY) connected++;
    ep_mod(c, idx, 0);
    start_request(idx);
}

static void handle_command(void) {
    char buf[256];
    ssize_t n = read(0, buf, sizeof buf - 1);
    if (n <= 0) {
        phase = PH_DONE;
        return;
    }
    buf[n] = 0;
    if (strstr(buf, "stop")) {
        phase = PH_STOP;
        t_stop = now_ns();
        t_last_end = t_stop;
        /* The harness signals the server only after this line, so no end of
         * connection can be seen before the stop phase has begun. */
        printf("{\"event\": \"stopping\"}\n");
        fflush(stdout);
    } else if (strstr(buf, "quit")) {
        phase = PH_DONE;
    }
}

static void print_ready(void) {
    printf("{\"event\": \"ready\", \"connected\": %d, \"ready\": %d, \"connect_seconds\": %.6f}\n",
           connected, ready, (double)(t_ready - t_begin) / 1e9);
    fflush(stdout);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host 127.0.0.1] [--mode echo|hold|active] [--conns N]\n"
            "       [--size BYTES] [--warmup S] [--duration S] [--connect-timeout S]\n"
            "       [--hold-timeout S] [--observe-timeout S] [--server-pid PID]\n"
            "       [--max-requests N] [--inflight N] [--short N] [--short-size BYTES]\n"
            "       [--slice S]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--size")) msg_size = atoi(v);
        else if (!strcmp(a, "--warmup")) warmup_s = atof(v);
        else if (!strcmp(a, "--duration")) duration_s = atof(v);
        else if (!strcmp(a, "--connect-timeout")) connect_timeout_s = atof(v);
        else if (!strcmp(a, "--hold-timeout")) hold_timeout_s = atof(v);
        else if (!strcmp(a, "--observe-timeout")) observe_timeout_s = atof(v);
        else if (!strcmp(a, "--server-pid")) server_pid = atoi(v);
        else if (!strcmp(a, "--max-requests")) max_requests = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--inflight")) inflight_max = atoi(v);
        else if (!strcmp(a, "--short")) nshort = atoi(v);
        else if (!strcmp(a, "--short-size")) short_size = atoi(v);
        else if (!strcmp(a, "--slice")) slice_s = atof(v);
        else if (!strcmp(a, "--mode")) {
            if (!strcmp(v, "echo")) mode = MODE_ECHO;
            else if (!strcmp(v, "hold")) mode = MODE_HOLD;
            else if (!strcmp(v, "active")) mode = MODE_ACTIVE;
            else usage();
        } else usage();
    }
    if (port <= 0 || port > 65535 || nconns < 0 || msg_size < 1 || msg_size > 65536 ||
        inflight_max < 1 || nshort < 0 || short_size < 1 || short_size > 65536 || slice_s <= 0)
        usage();
    /* Short connections only make sense under load; hold and active keep
     * their connections for the stop and idle workloads. */
    if (nconns + nshort < 1 || (nshort > 0 && mode != MODE_ECHO)) usage();
    nslots = nconns + nshort;
    stride = msg_size > short_size ? msg_size : short_size;
    memset(&dest, 0, sizeof dest);
    dest.sin_family = AF_INET;
    dest.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &dest.sin_addr) != 1) usage();
    if ((ntohl(dest.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: refusing non-loopback destination %s\n", host);
        exit(2);
    }
}

static void print_result(void) {
    double window = (double)(t_window_end - t_window_start) / 1e9;
    int measured = t_window_end > t_window_start;
    double client_cpu = measured ? (cpu_client_end - cpu_client_start) / window : -1;
    double server_cpu =
        (measured && cpu_server_start >= 0 && cpu_server_end >= 0)
            ? (cpu_server_end - cpu_server_start) / window
            : -1;
    const char *mode_name = mode == MODE_ECHO ? "echo" : mode == MODE_HOLD ? "hold" : "active";
    printf("{\"event\": \"result\", \"mode\": \"%s\", \"conns\": %d, \"size\": %d, ", mode_name, nconns,
           msg_size);
    int served = 0;
    for (int i = 0; i < nconns; i++) served += conns[i].window_done > 0;
    printf("\"connected\": %d, \"ready\": %d, \"connect_failures\": %llu, ", connected, ready,
           (unsigned long long)connect_failures);
    /* Connections that completed no request in the window: starved by the
     * server (never accepted, or never scheduled). */
    printf("\"served_in_window\": %d, ", measured ? served : -1);
    printf("\"connect_seconds\": %.6f, ",
           t_connected ? (double)(t_connected - t_begin) / 1e9 : -1.0);
    printf("\"ready_seconds\": %.6f, ", t_ready ? (double)(t_ready - t_begin) / 1e9 : -1.0);
    printf("\"duration\": %.6f, \"requests\": %llu, \"bytes\": %llu, \"throughput_rps\": %.3f, ",
           measured ? window : 0.0, (unsigned long long)window_requests,
           (unsigned long long)window_bytes, measured ? (double)window_requests / window : 0.0);
    printf("\"latency_us\": ");
    hist_print(&req_hist);
    printf(", ");
    if (nshort > 0) {
        printf("\"short\": {\"slots\": %d, \"size\": %d, \"completed\": %llu, "
               "\"rate\": %.3f, \"started\": %llu, \"connect_failures\": %llu, \"latency_us\": ",
               nshort, short_size, (unsigned long long)short_window,
               measured ? (double)short_window / window : 0.0, (unsigned long long)short_started,
               (unsigned long long)short_connect_failures);
        hist_print(&short_hist);
        printf("}, ");
    } else {
        printf("\"short\": null, ");
    }
    /* Completions per whole slice of the window (a partial last one is left out). */
    int nslices = 0;
    if (measured) {
        nslices = (int)(window / slice_s + 1e-9);
        if (nslices > MAX_SLICES) nslices = MAX_SLICES;
    }
    printf("\"slices\": {\"seconds\": %.3f, \"requests\": [", slice_s);
    for (int i = 0; i < nslices; i++)
        printf("%s%llu", i ? ", " : "", (unsigned long long)slice_requests[i]);
    printf("], \"short\": [");
    for (int i = 0; i < nslices && nshort > 0; i++)
        printf("%s%llu", i ? ", " : "", (unsigned long long)slice_short[i]);
    printf("]}, ");
    printf("\"errors\": {\"mismatch\": %llu, \"unsolicited\": %llu, \"eof\": %llu, \"reset\": %llu, "
           "\"other\": %llu}, ",
           (unsigned long long)err_mismatch, (unsigned long long)err_unsolicited,
           (unsigned long long)err_eof, (unsigned long long)err_reset,
           (unsigned long long)err_other);
    if (client_cpu >= 0)
        printf("\"client_cpu\": %.4f, ", client_cpu);
    else
        printf("\"client_cpu\": null, ");
    if (server_cpu >= 0)
        printf("\"server_cpu\": %.4f, ", server_cpu);
    else
        printf("\"server_cpu\": null, ");
    if (t_stop) {
        int notice_eof = 0, notice_reset = 0, notice_open = 0, eof = 0, reset = 0, open = 0,
            other = 0, notice_exact = 0;
        for (int i = 0; i < nconns; i++) {
            struct conn *c = &conns[i];
            if (c->state == C_UNUSED) continue;
            int notice = c->notice_len > 0;
            if (notice && c->notice_len >= (int)strlen(NOTICE_TEXT) &&
                !memcmp(c->notice, NOTICE_TEXT, strlen(NOTICE_TEXT)))
                notice_exact++;
            enum end e = c->state == C_CLOSED ? c->end : END_NONE;
            if (e == END_NONE && c->state == C_CLOSED) e = END_ERROR; /* ended before the stop */
            if (notice && e == END_EOF) notice_eof++;
            else if (notice && e == END_RESET) notice_reset++;
            else if (notice && e == END_NONE) notice_open++;
            else if (e == END_EOF) eof++;
            else if (e == END_RESET) reset++;
            else if (e == END_NONE) open++;
            else other++;
        }
        printf("\"stop\": {\"notice_eof\": %d, \"notice_reset\": %d, \"notice_open\": %d, "
               "\"notice_exact\": %d, \"eof\": %d, \"reset\": %d, \"open\": %d, \"other\": %d, "
               "\"echoes_after_stop\": %llu, \"unanswered\": %llu, \"partial_echoes\": %llu, "
               "\"reset_on_send\": %llu, "
               "\"last_end_seconds\": %.6f}, ",
               notice_eof, notice_reset, notice_open, notice_exact, eof, reset, open, other,
               (unsigned long long)stop_echoes, (unsigned long long)stop_unanswered,
               (unsigned long long)stop_partial, (unsigned long long)stop_reset_on_send,
               (double)(t_last_end - t_stop) / 1e9);
    } else {
        printf("\"stop\": null, ");
    }
    printf("\"total_requests\": %llu}\n", (unsigned long long)total_requests);
    fflush(stdout);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    pattern_init();
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);

    conns = calloc((size_t)nslots, sizeof *conns);
    sendbuf = malloc((size_t)nslots * (size_t)stride);
    reopen_queue = calloc((size_t)nslots, sizeof *reopen_queue);
    if (!conns || !sendbuf || !reopen_queue) die("malloc");
    for (int i = 0; i < nslots; i++) {
        conns[i].fd = -1;
        conns[i].kind = i < nconns ? K_BUSY : K_SHORT;
        conns[i].size = (uint32_t)(i < nconns ? msg_size : short_size);
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    if (mode != MODE_ECHO) {
        fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
        epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev); /* harmless if stdin is not pollable */
    }

    struct epoll_event events[MAX_EVENTS];
    t_begin = now_ns();
    uint64_t connect_deadline = t_begin + (uint64_t)(connect_timeout_s * 1e9);
    uint64_t phase_deadline = 0;

    while (phase != PH_DONE) {
        uint64_t t = now_ns();

        /* Phase transitions driven by the clock or by counts. */
        if (phase == PH_CONNECT) {
            while (opened < nconns && connecting_or_first < inflight_max) open_one(opened++);
            int all_in = ready + closed_count >= nconns;
            if (connected == nconns && !t_connected) t_connected = t;
            if (all_in || t >= connect_deadline) {
                if (!t_connected) t_connected = t;
                t_ready = t;
                if (mode == MODE_HOLD) {
                    phase = PH_WAIT;
                    phase_deadline = t + (uint64_t)(hold_timeout_s * 1e9);
                    print_ready();
                } else {
                    phase = PH_WARMUP;
                    phase_deadline = t + (uint64_t)(warmup_s * 1e9);
                    for (int i = 0; i < nconns; i++) {
                        if (conns[i].state != C_IDLE) continue;
                        conns[i].state = C_OPEN;
                        start_request(i);
                    }
                    for (int i = nconns; i < nslots; i++) open_one(i);
                }
            }
        } else if (phase == PH_WARMUP && t >= phase_deadline) {
            if (mode == MODE_ECHO) {
                phase = PH_MEASURE;
                t_window_start = t;
                phase_deadline = t + (uint64_t)(duration_s * 1e9);
                cpu_client_start = cpu_self();
                cpu_server_start = cpu_of(server_pid);
            } else {
                phase = PH_WAIT;
                phase_deadline = t + (uint64_t)(hold_timeout_s * 1e9);
                print_ready();
            }
        } else if (phase == PH_MEASURE && (t >= phase_deadline || total_requests >= max_requests)) {
            t_window_end = t;
            cpu_client_end = cpu_self();
            cpu_server_end = cpu_of(server_pid);
            phase = PH_DONE;
            break;
        } else if (phase == PH_WAIT && t >= phase_deadline) {
            fprintf(stderr, "loadgen: no command within --hold-timeout, giving up\n");
            phase = PH_DONE;
            break;
        } else if (phase == PH_STOP) {
            if (!phase_deadline || phase_deadline < t_stop)
                phase_deadline = t_stop + (uint64_t)(observe_timeout_s * 1e9);
            if (closed_count >= opened || t >= phase_deadline) {
                phase = PH_DONE;
                break;
            }
        }

        int timeout_ms = 10;
        int n = epoll_wait(epfd, events, MAX_EVENTS, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            uint32_t idx = events[i].data.u32;
            if (idx == STDIN_TAG) {
                handle_command();
                if (phase == PH_STOP) phase_deadline = 0;
                continue;
            }
            struct conn *c = &conns[idx];
            if (c->state == C_CLOSED || c->state == C_UNUSED) continue;
            if (c->state == C_CONNECTING) {
                if (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected((int)idx);
                continue;
            }
            if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable((int)idx);
            if (c->state != C_CLOSED && (events[i].events & EPOLLOUT) && c->in_flight)
                pump_send((int)idx);
        }
        reopen_pending();
    }

    if (!t_window_end && t_window_start) {
        t_window_end = now_ns();
        cpu_client_end = cpu_self();
        cpu_server_end = cpu_of(server_pid);
    }
    print_result();
    for (int i = 0; i < nslots; i++)
        if (conns[i].state != C_CLOSED && conns[i].state != C_UNUSED) close(conns[i].fd);
    return 0;
}
