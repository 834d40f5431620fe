/* hopbench: the two ends of one app<->sidecar hop, for scripts/bench_hop.py.
 *
 *   hopbench server-echo PORT [MAX_SECONDS]   sidecar stand-in: echo every byte back
 *   hopbench server-sink PORT [MAX_SECONDS]   sidecar stand-in: read and discard
 *   hopbench pingpong HOST PORT N [WARMUP]    app: N timed 64-byte round trips
 *   hopbench stream HOST PORT SECONDS         app: 64 KiB writes for SECONDS
 *
 * Servers listen on 127.0.0.1:PORT, print "ready" once bound, serve one connection at a
 * time and exit after MAX_SECONDS (default 600) even if nobody stops them. On accept they
 * send one byte ("hello"); clients wait for it before timing anything. That makes both
 * ends established (and, with meshaccel, both in the sockhash) before the first timed
 * byte, in both modes alike. The sink, on EOF, answers with the byte count it read (u64),
 * so the stream client times delivery to the reader, not just writes into a buffer.
 *
 * Servers print one JSON line per connection when it ends: bytes read, EAGAINs seen.
 * Clients print one JSON line and exit non-zero on any error or short transfer; each
 * client run is bounded by alarm(). Build: cc -O2 -o hopbench hopbench.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG 64
#define CHUNK (64 * 1024)

/* read() calls on these blocking sockets (no SO_RCVTIMEO) that failed with EAGAIN. POSIX
 * allows that only for non-blocking sockets or an expired receive timeout, so every one is
 * an anomaly of the socket layer under test: we wait in poll() and retry, and report the
 * count (clients in their JSON, servers in their per-connection line). */
static long eagain;
static const char *eagain_in = ""; /* the read that saw the last one */

static void die(const char *what)
{
	fprintf(stderr, "hopbench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("write");
		}
		buf += n;
		len -= (size_t)n;
	}
}

/* read(), retrying EINTR and (counted in eagain) EAGAIN; dies on other errors. */
static ssize_t read_some(int fd, char *buf, size_t len, const char *what)
{
	for (;;) {
		ssize_t n = read(fd, buf, len);
		struct pollfd pfd = { .fd = fd, .events = POLLIN };

		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			die(what);
		eagain++;
		eagain_in = what;
		if (poll(&pfd, 1, 1000) < 0 && errno != EINTR)
			die("poll");
	}
}

/* 1 when len bytes were read, 0 on EOF before any byte; dies on a partial read. */
static int read_all(int fd, char *buf, size_t len, const char *what)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = read_some(fd, buf + got, len - got, what);

		if (n == 0) {
			if (got == 0)
				return 0;
			errno = EPIPE;
			die(what);
		}
		got += (size_t)n;
	}
	return 1;
}

static void set_nodelay(int fd)
{
	int one = 1;

	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		die("TCP_NODELAY");
}

/* ---------------------------------------------------------------- servers */

static void serve(int port, int echo)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	static char buf[CHUNK];
	int one = 1;
	int lfd = socket(AF_INET, SOCK_STREAM, 0);

	if (lfd < 0)
		die("socket");
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("SO_REUSEADDR");
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind");
	if (listen(lfd, 16) < 0)
		die("listen");
	printf("ready\n");
	fflush(stdout);

	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		uint64_t total = 0;
		ssize_t n;

		eagain = 0;
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		if (echo)
			set_nodelay(fd);
		write_all(fd, "h", 1);
		while ((n = read_some(fd, buf, sizeof(buf), "server read")) != 0) {
			total += (uint64_t)n;
			if (echo)
				write_all(fd, buf, (size_t)n);
		}
		if (!echo)
			write_all(fd, (const char *)&total, sizeof(total));
		close(fd);
		printf("{\"bytes\": %llu, \"eagain\": %ld}\n", (unsigned long long)total, eagain);
		fflush(stdout);
	}
}

/* ---------------------------------------------------------------- clients */

static int dial(const char *host, int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	char hello;

	if (fd < 0)
		die("socket");
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		fprintf(stderr, "hopbench: bad IPv4 address %s\n", host);
		exit(2);
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("connect");
	if (!read_all(fd, &hello, 1, "read hello") || hello != 'h') {
		errno = EPROTO;
		die("no hello from server");
	}
	return fd;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void pingpong(const char *host, int port, long n, long warmup)
{
	uint64_t *lat = calloc((size_t)n, sizeof(*lat));
	char out[MSG], in[MSG];
	uint64_t sum = 0, t0, t1;
	int fd;

	if (!lat)
		die("calloc");
	memset(out, 'x', sizeof(out));
	fd = dial(host, port);
	set_nodelay(fd);
	for (long i = 0; i < warmup + n; i++) {
		t0 = now_ns();
		write_all(fd, out, MSG);
		if (!read_all(fd, in, MSG, "read echo")) {
			errno = EPIPE;
			die("server closed during ping-pong");
		}
		t1 = now_ns();
		if (i >= warmup)
			lat[i - warmup] = t1 - t0;
	}
	close(fd);
	for (long i = 0; i < n; i++)
		sum += lat[i];
	qsort(lat, (size_t)n, sizeof(*lat), cmp_u64);
	printf("{\"round_trips\": %ld, \"warmup\": %ld, \"msg_bytes\": %d, \"p50_ns\": %llu, "
	       "\"p99_ns\": %llu, \"mean_ns\": %llu, \"max_ns\": %llu, \"eagain\": %ld, "
	       "\"eagain_in\": \"%s\"}\n",
	       n, warmup, MSG, (unsigned long long)lat[n / 2],
	       (unsigned long long)lat[(n * 99) / 100], (unsigned long long)(sum / (uint64_t)n),
	       (unsigned long long)lat[n - 1], eagain, eagain_in);
	free(lat);
}

static void stream(const char *host, int port, double seconds)
{
	static char buf[CHUNK];
	uint64_t sent = 0, received = 0, t0, t1, stop;
	int fd;

	memset(buf, 's', sizeof(buf));
	fd = dial(host, port);
	t0 = now_ns();
	stop = t0 + (uint64_t)(seconds * 1e9);
	while (now_ns() < stop) {
		write_all(fd, buf, CHUNK);
		sent += CHUNK;
	}
	if (shutdown(fd, SHUT_WR) < 0)
		die("shutdown");
	if (!read_all(fd, (char *)&received, sizeof(received), "read byte count")) {
		errno = EPIPE;
		die("no byte count from sink");
	}
	t1 = now_ns();
	close(fd);
	if (received != sent) {
		fprintf(stderr, "hopbench: sent %llu bytes, sink read %llu\n",
			(unsigned long long)sent, (unsigned long long)received);
		exit(1);
	}
	printf("{\"bytes\": %llu, \"write_bytes\": %d, \"seconds\": %.6f, \"bytes_per_s\": %.0f, "
	       "\"eagain\": %ld, \"eagain_in\": \"%s\"}\n",
	       (unsigned long long)sent, CHUNK, (double)(t1 - t0) / 1e9,
	       (double)sent / ((double)(t1 - t0) / 1e9), eagain, eagain_in);
}

static void usage(void)
{
	fprintf(stderr, "usage: hopbench server-echo PORT [MAX_SECONDS] | server-sink PORT [MAX_SECONDS]\n"
			"       | pingpong HOST PORT N [WARMUP] | stream HOST PORT SECONDS\n");
	exit(2);
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN); /* a vanished peer is an EPIPE error, reported */
	if (argc >= 3 && (!strcmp(argv[1], "server-echo") || !strcmp(argv[1], "server-sink"))) {
		alarm(argc >= 4 ? (unsigned)atoi(argv[3]) : 600);
		serve(atoi(argv[2]), !strcmp(argv[1], "server-echo"));
	} else if (argc >= 5 && !strcmp(argv[1], "pingpong")) {
		long n = atol(argv[4]);
		long warmup = argc >= 6 ? atol(argv[5]) : 1000;

		if (n < 1 || warmup < 0)
			usage();
		alarm(60);
		pingpong(argv[2], atoi(argv[3]), n, warmup);
	} else if (argc == 5 && !strcmp(argv[1], "stream")) {
		double seconds = atof(argv[4]);

		if (seconds <= 0 || seconds > 60)
			usage();
		alarm((unsigned)seconds + 30);
		stream(argv[2], atoi(argv[3]), seconds);
	} else {
		usage();
	}
	return 0;
}
