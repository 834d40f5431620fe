/* openloop: an open-loop (fixed arrival rate) HTTP/1.1 load generator.
 *
 * Request i is due at t0 + i/rate whether or not earlier ones have been answered, and its
 * latency is measured from that *scheduled* time, so a slow server shows up as latency
 * (queueing included) instead of as a lower request rate (no coordinated omission). A due
 * request goes to an idle keep-alive connection; if none is idle it is dropped and counted
 * (k6's dropped_iterations). Single-threaded and epoll-based to stay cheap on CPU; wakeups
 * come from a timerfd armed at absolute times because epoll_wait's timeout only has
 * millisecond resolution, and every microsecond of late sending would count as latency.
 *
 * usage: openloop --url http://IP[:PORT][/path] --rate R --duration D --connections N
 *                 [--timeout T] [--warmup W]
 * Prints one JSON object on stdout. Exit 2: bad arguments; exit 1: setup failed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define INBUF 16384               /* per connection: headers and chunk lines must fit */
#define RETRY_NS 100000000LL      /* wait this long before retrying a failed reconnect */
#define NS 1000000000LL

enum cstate { C_DOWN, C_CONNECTING, C_IDLE, C_BUSY };
enum pstate { P_HEAD, P_LEN, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_CRLF, P_TRAILER, P_CLOSE };

struct conn {
    int fd;
    enum cstate state;
    int64_t deadline;   /* C_CONNECTING/C_BUSY: timeout; C_DOWN: when to retry */
    uint64_t idx;       /* the request in flight: its index and scheduled time */
    int64_t sched;
    size_t out_off;     /* bytes of the request written so far (partial writes) */
    int want_out;       /* EPOLLOUT registered */
    enum pstate ps;     /* response parser */
    int status, close_after;
    uint64_t remaining; /* body or chunk bytes still to skip */
    size_t len;
    char in[INBUF];
};

static const char *url;
static struct sockaddr_storage addr;
static socklen_t addrlen;
static char *req;
static size_t reqlen;
static double rate, duration, timeout_s = 5, warmup;
static long nconn;
static int64_t timeout_ns, armed = -1;
static int ep, tfd, starting = 1, warned;
static struct conn *conns;
static long rr; /* round-robin start for finding an idle connection */
static uint64_t nwarm, sent, completed, dropped, errors, non2xx;
static double *lat; /* latencies of completed requests, ms */
static size_t nlat, latcap;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * NS + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "openloop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void bad(const char *flag, const char *val, const char *why) {
    fprintf(stderr, "openloop: bad %s '%s': %s\n", flag, val, why);
    exit(2);
}

static void watch(struct conn *c, int op, uint32_t events) {
    struct epoll_event e = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &e) < 0) die("epoll_ctl");
}

/* A (re)connect failed: fatal while setting up, else retry a bit later. */
static void conn_failed(struct conn *c, int err) {
    if (starting) {
        fprintf(stderr, "openloop: connect to %s: %s\n", url, strerror(err));
        exit(1);
    }
    if (!warned++)
        fprintf(stderr, "openloop: reconnect to %s failed: %s (retrying)\n", url, strerror(err));
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = C_DOWN;
    c->deadline = now_ns() + RETRY_NS;
}

static void conn_open(struct conn *c, int64_t now) {
    int one = 1;
    c->len = 0;
    c->want_out = 0;
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        conn_failed(c, errno);
        return;
    }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, addrlen) == 0) {
        c->state = C_IDLE;
        watch(c, EPOLL_CTL_ADD, EPOLLIN);
    } else if (errno == EINPROGRESS) {
        c->state = C_CONNECTING;
        c->deadline = now + timeout_ns;
        watch(c, EPOLL_CTL_ADD, EPOLLOUT);
    } else {
        conn_failed(c, errno);
    }
}

/* Drop the connection (server closed it, error, timeout) and open a new one. A request in
 * flight on it counts as an error. */
static void reconnect(struct conn *c, int64_t now) {
    if (c->state == C_BUSY && c->idx >= nwarm) errors++;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    conn_open(c, now);
}

static void complete(struct conn *c, int64_t t) {
    c->state = C_IDLE;
    c->len = 0; /* nothing was asked for after this response: drop any extra bytes */
    if (c->out_off < reqlen) c->close_after = 1; /* answered before we finished sending */
    if (c->idx < nwarm) return;
    completed++;
    if (c->status < 200 || c->status > 299) non2xx++;
    if (nlat == latcap) {
        latcap = latcap ? 2 * latcap : 4096;
        if (!(lat = realloc(lat, latcap * sizeof *lat))) die("realloc");
    }
    lat[nlat++] = (double)(t - c->sched) / 1e6;
}

/* Value of header line [l, e) if its name is `name` (with the colon), else NULL. */
static const char *header(const char *l, const char *e, const char *name) {
    size_t n = strlen(name);
    if ((size_t)(e - l) < n || strncasecmp(l, name, n)) return NULL;
    for (l += n; l < e && (*l == ' ' || *l == '\t'); l++) {}
    return l;
}

static int has_token(const char *v, const char *e, const char *tok) {
    size_t n = strlen(tok);
    for (; v + n <= e; v++)
        if (!strncasecmp(v, tok, n)) return 1;
    return 0;
}

/* Status line and headers in [p, end) (each line ends in \r\n). Sets how the body is
 * framed; returns 1 if the response has no body, 0 if it has, -1 if malformed. */
static int parse_head(struct conn *c, const char *p, const char *end) {
    int64_t clen = -1;
    int chunked = 0;
    if (end - p < 14 || memcmp(p, "HTTP/1.", 7) || p[8] != ' ') return -1;
    for (int i = 9; i < 12; i++)
        if (p[i] < '0' || p[i] > '9') return -1;
    c->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    c->close_after = p[7] == '0'; /* HTTP/1.0 closes unless it says keep-alive */
    for (const char *l = (const char *)memchr(p, '\n', end - p) + 1, *e; l < end; l = e + 1) {
        const char *v;
        e = memchr(l, '\n', end - l);
        if ((v = header(l, e, "content-length:"))) {
            char *q;
            if (*v < '0' || *v > '9') return -1;
            clen = strtoll(v, &q, 10);
            if (*q != '\r' && *q != ' ' && *q != '\t') return -1;
        } else if ((v = header(l, e, "transfer-encoding:"))) {
            chunked = has_token(v, e, "chunked");
        } else if ((v = header(l, e, "connection:"))) {
            if (has_token(v, e, "close")) c->close_after = 1;
            else if (has_token(v, e, "keep-alive")) c->close_after = 0;
        }
    }
    if (c->status < 200) c->ps = P_HEAD; /* interim (1xx): the real response follows */
    else if (c->status == 204 || c->status == 304) return 1;
    else if (chunked) c->ps = P_CHUNK_SIZE;
    else if (clen == 0) return 1;
    else if (clen > 0) c->ps = P_LEN, c->remaining = (uint64_t)clen;
    else c->ps = P_CLOSE; /* no framing: the body runs until the server closes */
    return 0;
}

/* Consume what is buffered: 1 = a whole response, 0 = need more bytes, -1 = malformed.
 * Body bytes are skipped as they arrive, so only headers and chunk lines need to fit. */
static int parse(struct conn *c) {
    size_t off = 0;
    int r = 0;
    while (r == 0) {
        char *p = c->in + off, *eol;
        size_t avail = c->len - off, take;
        switch (c->ps) {
        case P_HEAD:
            if (!(eol = memmem(p, avail, "\r\n\r\n", 4))) goto more;
            if ((r = parse_head(c, p, eol + 2)) < 0) return -1;
            off += eol + 4 - p;
            break;
        case P_LEN:
        case P_CHUNK_DATA:
            take = avail < c->remaining ? avail : c->remaining;
            off += take;
            if ((c->remaining -= take)) goto more;
            if (c->ps == P_LEN) r = 1;
            else c->ps = P_CHUNK_CRLF;
            break;
        case P_CHUNK_CRLF:
            if (avail < 2) goto more;
            if (memcmp(p, "\r\n", 2)) return -1;
            off += 2;
            c->ps = P_CHUNK_SIZE;
            break;
        case P_CHUNK_SIZE:
        case P_TRAILER:
            if (!(eol = memmem(p, avail, "\r\n", 2))) goto more;
            if (c->ps == P_TRAILER) {
                r = eol == p; /* trailer fields end with an empty line */
            } else {
                char *q;
                uint64_t n;
                errno = 0;
                n = strtoull(p, &q, 16); /* hex size, maybe ";extensions" */
                if (!isxdigit((unsigned char)*p) || errno || (q < eol && *q != ';' && *q != ' '))
                    return -1;
                c->ps = n ? P_CHUNK_DATA : P_TRAILER;
                c->remaining = n;
            }
            off += eol + 2 - p;
            break;
        case P_CLOSE:
            off = c->len;
            goto more;
        }
    }
    if (r == 1) c->ps = P_HEAD;
more:
    memmove(c->in, c->in + off, c->len - off);
    c->len -= off;
    return r;
}

/* Write what is left of the request; wait for EPOLLOUT if the socket buffer is full. */
static void flush(struct conn *c, int64_t now) {
    while (c->out_off < reqlen) {
        ssize_t n = send(c->fd, req + c->out_off, reqlen - c->out_off, MSG_NOSIGNAL);
        if (n >= 0) {
            c->out_off += (size_t)n;
        } else if (errno == EAGAIN) {
            if (!c->want_out) watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
            c->want_out = 1;
            return;
        } else if (errno != EINTR) {
            reconnect(c, now);
            return;
        }
    }
    if (c->want_out) watch(c, EPOLL_CTL_MOD, EPOLLIN);
    c->want_out = 0;
}

static void on_readable(struct conn *c) {
    for (;;) {
        ssize_t n;
        int r;
        if (c->len == INBUF) { /* a header or chunk line too long */
            reconnect(c, now_ns());
            return;
        }
        n = read(c->fd, c->in + c->len, INBUF - c->len);
        int64_t t = now_ns(); /* the response time: as close to the read as we can get */
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) { /* closed by the server or reset */
            if (c->state == C_BUSY && c->ps == P_CLOSE) complete(c, t);
            reconnect(c, t);
            return;
        }
        if (c->state != C_BUSY) continue; /* unasked-for bytes (e.g. a 408 before closing) */
        c->len += (size_t)n;
        if ((r = parse(c)) > 0) complete(c, t);
        if (r < 0 || (r > 0 && c->close_after)) reconnect(c, t);
        return; /* level-triggered: epoll tells us again if more is waiting */
    }
}

static void on_event(struct conn *c, uint32_t ev) {
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0) err = errno;
        if (!err && !(ev & EPOLLOUT)) err = ECONNRESET;
        if (err) {
            conn_failed(c, err);
        } else {
            c->state = C_IDLE;
            watch(c, EPOLL_CTL_MOD, EPOLLIN);
        }
        return;
    }
    if ((ev & EPOLLOUT) && c->state == C_BUSY && c->want_out) flush(c, now_ns());
    if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && (c->state == C_IDLE || c->state == C_BUSY))
        on_readable(c);
}

/* Send request i (scheduled at `sched`) on an idle connection, or drop it. */
static void dispatch(uint64_t i, int64_t sched, int64_t now) {
    for (long k = 0; k < nconn; k++) {
        struct conn *c = &conns[(rr + k) % nconn];
        if (c->state != C_IDLE) continue;
        rr = (rr + k + 1) % nconn; /* spread requests over the connections */
        c->state = C_BUSY;
        c->idx = i;
        c->sched = sched;
        c->deadline = sched + timeout_ns;
        c->out_off = 0;
        c->ps = P_HEAD;
        c->len = 0;
        if (i >= nwarm) sent++;
        flush(c, now);
        return;
    }
    if (i >= nwarm) dropped++;
}

/* Time out requests and connects, retry failed reconnects; returns the next deadline. */
static int64_t sweep(int64_t now, int *busy) {
    int64_t wake = INT64_MAX;
    *busy = 0;
    for (long k = 0; k < nconn; k++) {
        struct conn *c = &conns[k];
        if (c->state != C_IDLE && c->deadline <= now) {
            if (c->state == C_DOWN) conn_open(c, now);
            else if (c->state == C_CONNECTING) conn_failed(c, ETIMEDOUT);
            else reconnect(c, now); /* no response in time: an error */
        }
        if (c->state != C_IDLE && c->deadline < wake) wake = c->deadline;
        *busy += c->state == C_BUSY;
    }
    return wake;
}

/* Sleep until `wake` (CLOCK_MONOTONIC ns) or socket events, then handle those. */
static void poll_once(int64_t wake) {
    struct epoll_event evs[64];
    if (wake != armed) {
        struct itimerspec its = {.it_value = {.tv_sec = wake / NS, .tv_nsec = wake % NS}};
        if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
        armed = wake;
    }
    int n = epoll_wait(ep, evs, 64, -1);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    for (int i = 0; i < n; i++) {
        if (evs[i].data.ptr) {
            on_event(evs[i].data.ptr, evs[i].events);
        } else {
            uint64_t ticks;
            if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN) die("read timerfd");
            armed = -1; /* expired: re-arm even if the next wake time is the same */
        }
    }
}

static void parse_url(const char *u) {
    const char *h = u + 7, *hend, *p;
    char host[INET6_ADDRSTRLEN];
    long port = 80;
    int v6;
    if (strncmp(u, "http://", 7)) bad("--url", u, "only http:// URLs are supported");
    v6 = *h == '[';
    hend = v6 ? strchr(h, ']') : h + strcspn(h, ":/");
    if (!hend || (size_t)(hend - h - v6) >= sizeof host) bad("--url", u, "bad host");
    memcpy(host, h + v6, hend - h - v6);
    host[hend - h - v6] = 0;
    p = hend + v6;
    if (*p == ':') {
        char *q;
        port = strtol(p + 1, &q, 10);
        if (!isdigit((unsigned char)p[1]) || port < 1 || port > 65535 || (*q && *q != '/'))
            bad("--url", u, "bad port");
        p = q;
    }
    if (*p && *p != '/') bad("--url", u, "path must start with /");
    for (const char *q = p; *q; q++)
        if (*q <= ' ' || *q == 127) bad("--url", u, "path has a space or control character");
    memset(&addr, 0, sizeof addr);
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addr;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) bad("--url", u, "bad IPv6 address");
        addrlen = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&addr;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
            bad("--url", u, "host must be a literal IPv4 address or [IPv6] address");
        addrlen = sizeof *a;
    }
    /* Host: the authority as written in the URL */
    const char *fmt = "GET %s HTTP/1.1\r\nHost: %.*s\r\nUser-Agent: meshaccel-openloop\r\n\r\n";
    size_t cap = strlen(u) + 128;
    if (!(req = malloc(cap))) die("malloc");
    reqlen = (size_t)snprintf(req, cap, fmt, *p ? p : "/", (int)(p - h), h);
}

/* A number in (0, hi], or [0, hi] if zero_ok. */
static double number(const char *flag, const char *v, int zero_ok, double hi) {
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || !isfinite(x)) bad(flag, v, "not a number");
    if (x < 0 || (!zero_ok && x == 0)) bad(flag, v, zero_ok ? "must be >= 0" : "must be > 0");
    if (x > hi) bad(flag, v, "too large");
    return x;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *flag = argv[i], *v = strchr(flag, '=');
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) {
            puts("usage: openloop --url http://IP[:PORT][/path] --rate R --duration D "
                 "--connections N [--timeout T] [--warmup W]");
            exit(0);
        }
        if (v) *v++ = 0; /* --flag=value */
        else if (i + 1 < argc) v = argv[++i];
        else bad(flag, "", "needs a value");
        if (!strcmp(flag, "--url")) parse_url(url = v);
        else if (!strcmp(flag, "--rate")) rate = number(flag, v, 0, 1e7);
        else if (!strcmp(flag, "--duration")) duration = number(flag, v, 0, 1e6);
        else if (!strcmp(flag, "--timeout")) timeout_s = number(flag, v, 0, 3600);
        else if (!strcmp(flag, "--warmup")) warmup = number(flag, v, 1, 1e6);
        else if (!strcmp(flag, "--connections")) {
            nconn = (long)number(flag, v, 0, 100000);
            if (nconn < 1 || nconn != strtod(v, NULL)) bad(flag, v, "must be a whole number >= 1");
        } else bad("flag", flag, "unknown (see --help)");
    }
    const char *missing = !url ? "--url" : !rate ? "--rate" : !duration ? "--duration"
                        : !nconn ? "--connections" : NULL;
    if (missing) {
        fprintf(stderr, "openloop: %s is required (see --help)\n", missing);
        exit(2);
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest latency with at least p% of all at or below it. */
static double pct(double p) {
    size_t rank;
    if (!nlat) return 0;
    rank = (size_t)ceil(p / 100 * (double)nlat - 1e-9);
    return lat[(rank < 1 ? 1 : rank > nlat ? nlat : rank) - 1];
}

int main(int argc, char **argv) {
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    int busy, ready;
    signal(SIGPIPE, SIG_IGN); /* a server closing on us must be an error, not our death */
    parse_args(argc, argv);
    timeout_ns = (int64_t)(timeout_s * 1e9);
    nwarm = (uint64_t)(rate * warmup + 1e-9);
    uint64_t nmain = (uint64_t)(rate * duration + 1e-9), total = nwarm + nmain, next = 0;

    if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1");
    if ((tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)) < 0)
        die("timerfd_create");
    if (epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &e) < 0) die("epoll_ctl");
    if (!(conns = calloc((size_t)nconn, sizeof *conns))) die("calloc");

    /* All connections up before the clock starts, so connecting is not measured. */
    int64_t now = now_ns();
    for (long k = 0; k < nconn; k++) conn_open(&conns[k], now);
    for (;;) {
        int64_t wake = sweep(now_ns(), &busy);
        for (ready = 0; ready < nconn && conns[ready].state == C_IDLE; ready++) {}
        if (ready == nconn) break;
        poll_once(wake);
    }
    starting = 0;

    int64_t t0 = now_ns();
#define SCHED(i) (t0 + (int64_t)((double)(i) * 1e9 / rate))
    int64_t start = SCHED(nwarm), end = start + (int64_t)(duration * 1e9);
    for (;;) {
        now = now_ns();
        /* Catch up: everything due by now goes out (or is dropped) with its own time. */
        for (; next < total && SCHED(next) <= now; next++) dispatch(next, SCHED(next), now);
        int64_t wake = sweep(now, &busy);
        if (next < total) {
            if (SCHED(next) < wake) wake = SCHED(next);
        } else if (!busy) { /* all answered or timed out: stop at the end of the period */
            if (now >= end) break;
            if (end < wake) wake = end;
        }
        poll_once(wake);
    }

    if (nlat) qsort(lat, nlat, sizeof *lat, cmp); /* lat is NULL when none completed */
    double dur = (double)(now - start) / 1e9, sum = 0;
    for (size_t k = 0; k < nlat; k++) sum += lat[k];
    printf("{\"scheduled\":%llu,\"sent\":%llu,\"completed\":%llu,\"dropped\":%llu,"
           "\"errors\":%llu,\"non2xx\":%llu,\"duration_s\":%.4f,\"rps\":%.2f,"
           "\"p50_ms\":%.4f,\"p90_ms\":%.4f,\"p99_ms\":%.4f,\"p999_ms\":%.4f,"
           "\"max_ms\":%.4f,\"mean_ms\":%.4f}\n",
           (unsigned long long)nmain, (unsigned long long)sent, (unsigned long long)completed,
           (unsigned long long)dropped, (unsigned long long)errors, (unsigned long long)non2xx,
           dur, dur > 0 ? (double)completed / dur : 0.0, pct(50), pct(90), pct(99), pct(99.9),
           nlat ? lat[nlat - 1] : 0.0, nlat ? sum / (double)nlat : 0.0);
    return fflush(stdout) ? 1 : 0;
}
