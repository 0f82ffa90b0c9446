/*
 * lineload: closed-loop load generator for the PostgreSQL gateway benchmark.
 *
 * One thread, one epoll set, CONNS non-blocking connections to a loopback
 * server speaking the gateway's line protocol. Each connection keeps exactly
 * one request in flight: it writes one request line, reads one reply line,
 * checks it, records the latency, and sends the next request.
 *
 *   lookup  "GET <id>\n" with a random id in 1..ROWS; the reply must be the
 *           row as JSON, starting with {"id":<id>,
 *   sleep   "SLOW <seconds>\n"; the reply must be "OK slept <seconds>\n"
 *
 * All connections are opened first (a connection counts once its first reply
 * arrives), then the load runs WARMUP seconds unmeasured and DURATION
 * seconds measured. One JSON object goes to stdout: requests and errors in
 * the measured window, throughput, latency percentiles, connections that
 * never got a reply, and this process's own CPU time (a client that used a
 * whole core was the limit, not the server).
 *
 * Bounded: connecting by --connect-timeout, the run by warm-up + duration.
 * Only loopback destinations (127.0.0.0/8) are accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REPLY_MAX 4096
#define MAX_SAMPLES (8 * 1000 * 1000)

struct conn {
    int fd;
    int connected;  /* got its first reply */
    long id;        /* id asked for (lookup) */
    double sent_at;
    size_t sent, to_send;
    size_t got;
    char out[64];
    char in[REPLY_MAX];
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fprintf(stderr,
            "usage: lineload --port P --conns N --mode lookup|sleep [--host 127.0.0.1]\n"
            "                [--rows ROWS] [--sleep SECONDS] [--warmup S] [--duration S]\n"
            "                [--connect-timeout S] [--seed N]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *mode = NULL, *sleep_arg = "0.01";
    int port = 0, nconns = 0;
    long rows = 10000;
    double warmup = 2, duration = 5, connect_timeout = 30;
    unsigned seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--mode")) mode = v;
        else if (!strcmp(a, "--rows")) rows = atol(v);
        else if (!strcmp(a, "--sleep")) sleep_arg = v;
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--connect-timeout")) connect_timeout = atof(v);
        else if (!strcmp(a, "--seed")) seed = (unsigned)atoi(v);
        else usage();
    }
    if (port <= 0 || nconns <= 0 || !mode || rows <= 0) usage();
    int lookup = !strcmp(mode, "lookup");
    if (!lookup && strcmp(mode, "sleep")) usage();
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
        (ntohl(addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "lineload: only 127.0.0.0/8 destinations are allowed\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nconns + 64) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    srand(seed);
    char expect_sleep[64];
    snprintf(expect_sleep, sizeof expect_sleep, "OK slept %s\n", sleep_arg);

    int ep = epoll_create1(0);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    double *samples = malloc(MAX_SAMPLES * sizeof *samples);
    if (ep < 0 || !conns || !samples) {
        perror("lineload: setup");
        return 1;
    }
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
            perror("lineload: connect");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }

    /* Every connection starts with a request queued: writing it waits for the connect. */
    double start = now();
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->id = 1 + rand() % rows;
        c->to_send = lookup ? (size_t)snprintf(c->out, sizeof c->out, "GET %ld\n", c->id)
                            : (size_t)snprintf(c->out, sizeof c->out, "SLOW %s\n", sleep_arg);
        c->sent_at = start;
    }
    int connected = 0;
    double measure_from = 0, measure_until = 0, connect_deadline = start + connect_timeout;
    long requests = 0, errors = 0, samples_n = 0, closed = 0;
    char first_error[200] = "";
    struct rusage ru0, ru1;
    struct epoll_event events[1024];

    for (;;) {
        double t = now();
        if (connected < nconns && t > connect_deadline) break;
        if (measure_until && t >= measure_until) break;
        if (closed == nconns) break;
        int n = epoll_wait(ep, events, 1024, 50);
        t = now();
        for (int k = 0; k < n; k++) {
            struct conn *c = &conns[events[k].data.u32];
            if (c->fd < 0) continue;
            if ((events[k].events & EPOLLOUT) && c->sent < c->to_send) {
                ssize_t w = send(c->fd, c->out + c->sent, c->to_send - c->sent, MSG_NOSIGNAL);
                if (w > 0) c->sent += (size_t)w;
                else if (w < 0 && errno != EAGAIN && errno != EINPROGRESS) goto lost;
                if (c->sent == c->to_send) {
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data = events[k].data};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
            if (!(events[k].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) continue;
            ssize_t r = recv(c->fd, c->in + c->got, REPLY_MAX - 1 - c->got, 0);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) goto lost;
            c->got += (size_t)r;
            c->in[c->got] = 0;
            char *end = memchr(c->in, '\n', c->got);
            if (!end) {
                if (c->got >= REPLY_MAX - 1) goto lost;
                continue;
            }
            {
                /* One reply line: check it, count it, send the next request. */
                int ok;
                if (lookup) {
                    char prefix[48];
                    int len = snprintf(prefix, sizeof prefix, "{\"id\":%ld,", c->id);
                    ok = strncmp(c->in, prefix, (size_t)len) == 0;
                } else {
                    ok = strcmp(c->in, expect_sleep) == 0;
                }
                if (!ok && !first_error[0])
                    snprintf(first_error, sizeof first_error, "%.*s", (int)(end - c->in), c->in);
                if (!c->connected) {
                    c->connected = 1;
                    if (++connected == nconns) {
                        /* All connected: warm up, then measure. */
                        measure_from = t + warmup;
                        measure_until = measure_from + duration;
                    }
                } else if (measure_from && t >= measure_from && t < measure_until) {
                    if (ok) requests++;
                    else errors++;
                    if (ok && samples_n < MAX_SAMPLES) samples[samples_n++] = t - c->sent_at;
                    if (requests + errors == 1) getrusage(RUSAGE_SELF, &ru0);
                }
                if (end + 1 != c->in + c->got) {
                    snprintf(first_error, sizeof first_error, "more than one reply line");
                    goto lost;
                }
                c->got = 0;
                c->id = 1 + rand() % rows;
                c->to_send = lookup ? (size_t)snprintf(c->out, sizeof c->out, "GET %ld\n", c->id)
                                    : c->to_send;
                c->sent = 0;
                c->sent_at = t;
                ssize_t w = send(c->fd, c->out, c->to_send, MSG_NOSIGNAL);
                if (w > 0) c->sent = (size_t)w;
                else if (w < 0 && errno != EAGAIN) goto lost;
                if (c->sent < c->to_send) {
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                                             .data = events[k].data};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
            continue;
        lost:
            if (!first_error[0]) snprintf(first_error, sizeof first_error, "connection lost");
            close(c->fd);
            c->fd = -1;
            closed++;
        }
    }
    getrusage(RUSAGE_SELF, &ru1);
    double measured = measure_until ? duration : 0;
    qsort(samples, (size_t)samples_n, sizeof *samples, cmp_double);
#define PCT(p) (samples_n ? samples[(long)((p) * (samples_n - 1))] * 1e3 : 0.0)
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    long silent = 0;
    for (int i = 0; i < nconns; i++) silent += !conns[i].connected;
    for (char *p = first_error; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 32) *p = '?';
    printf("{\"mode\":\"%s\",\"conns\":%d,\"connected\":%d,\"never_answered\":%ld,"
           "\"lost\":%ld,\"requests\":%ld,\"errors\":%ld,\"duration\":%.3f,\"rps\":%.1f,"
           "\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,"
           "\"client_cpu\":%.3f,\"first_error\":\"%s\"}\n",
           mode, nconns, connected, silent, closed, requests, errors, measured,
           measured ? requests / measured : 0.0, PCT(0.5), PCT(0.9), PCT(0.99), PCT(1.0),
           measured ? cpu / measured : 0.0, first_error);
    return connected == nconns ? 0 : 1;
}
