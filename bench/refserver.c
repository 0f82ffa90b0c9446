/*
 * refserver: the smallest reasonable epoll echo server, the benchmarks'
 * reference for what this machine's loopback TCP stack can do on one core.
 *
 * One thread, level-triggered epoll, non-blocking sockets. Bytes that the
 * peer does not take at once are kept per connection and flushed on EPOLLOUT,
 * and reading from that connection pauses meanwhile, so a slow reader cannot
 * make the server buffer without bound. SIGTERM keeps its default action (the
 * process dies), like most of the Python peers.
 *
 * usage: refserver --port P [--host 127.0.0.1]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 512

struct pending {
    char *data;
    size_t len, off;
};

static struct pending *pend; /* indexed by fd; fds are small dense integers */
static size_t pend_cap;
static int epfd;

static void die(const char *what) {
    fprintf(stderr, "refserver: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void drop(int fd) {
    if ((size_t)fd < pend_cap) {
        free(pend[fd].data);
        pend[fd] = (struct pending){0};
    }
    close(fd); /* closing also removes it from the epoll set */
}

static void set_events(int fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) < 0) die("epoll_ctl mod");
}

/* Write buf; keep what the socket does not take. Returns 0, or -1 to drop. */
static int send_or_keep(int fd, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pending *p = &pend[fd];
            p->data = malloc(len - off);
            if (!p->data) die("malloc");
            memcpy(p->data, buf + off, len - off);
            p->len = len - off;
            p->off = 0;
            set_events(fd, EPOLLOUT);
            return 0;
        } else {
            return -1;
        }
    }
    return 0;
}

static void on_writable(int fd) {
    struct pending *p = &pend[fd];
    while (p->off < p->len) {
        ssize_t n = send(fd, p->data + p->off, p->len - p->off, MSG_NOSIGNAL);
        if (n > 0) {
            p->off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;
        } else {
            drop(fd);
            return;
        }
    }
    free(p->data);
    *p = (struct pending){0};
    set_events(fd, EPOLLIN);
}

static void on_readable(int fd) {
    static char buf[BUF_SIZE];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
        if (send_or_keep(fd, buf, (size_t)n) < 0) drop(fd);
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        drop(fd);
    }
}

static void on_accept(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            /* EAGAIN ends the batch; anything else (EMFILE...) is retried on
             * the next wakeup rather than spinning here. */
            return;
        }
        if ((size_t)fd >= pend_cap) {
            close(fd); /* cannot happen below RLIMIT_NOFILE, kept for safety */
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--host")) host = argv[i + 1];
    }
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: refserver --port P [--host 127.0.0.1]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    pend_cap = (size_t)rl.rlim_cur;
    pend = calloc(pend_cap, sizeof *pend);
    if (!pend) die("calloc");

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("inet_pton");
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    /* The kernel caps the backlog at net.core.somaxconn. */
    if (listen(lfd, 65535) < 0) die("listen");

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl listen");

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                on_accept(lfd);
            } else if (events[i].events & EPOLLOUT) {
                on_writable(fd);
            } else {
                on_readable(fd);
            }
        }
    }
}
