/* SPDX-License-Identifier: Apache-2.0
 *
 * tcpmany: many idle established TCP connections on loopback, for
 * bench/tcp.sh (the cost of --tcp-established per connection).
 *
 *   tcpmany server PORT N DIR
 *       Listens on 127.0.0.1:PORT (0: an ephemeral port) and writes
 *       DIR/listen ("pid=..\nport=..\n") once it listens.  Accepts
 *       connections and echoes every byte it reads on any of them back,
 *       uppercased, on the same connection (one thread, poll()).  When N
 *       connections are accepted (at once for N = 0) it writes DIR/ready
 *       ("pid=..\nport=..\nconns=N\n").  It keeps the listener open (a
 *       server, as floe would find one) and echoes on later connections
 *       too.  A connection whose peer closes is closed.
 *
 *   tcpmany client PORT N DIR
 *       Opens N connections to 127.0.0.1:PORT, one after the other,
 *       writes DIR/client ("pid=..\nconns=N\n") and then sleeps in
 *       sigsuspend(): the connections stay idle.  On SIGUSR1 it checks
 *       every connection: sends one lowercase letter on each (all first),
 *       then waits (at most CHECK_TIMEOUT_MS in total) for each one's
 *       uppercased echo, and writes DIR/check atomically:
 *         seq=K ok=A of=N eof=E reset=R timeout=T wrong=W max_ms=X
 *       (seq: 1 for the first check, and so on; max_ms: time from the
 *       sends until the last echo arrived).  A connection that failed
 *       once is not checked again (counted as dead in later checks).
 *
 * All files are written as DIR/.NAME.tmp and renamed.  Both modes raise
 * RLIMIT_NOFILE to its hard limit, so N may exceed 1000.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHECK_TIMEOUT_MS 10000

static void write_file(const char *dir, const char *name, const char *text)
{
	char path[4096], tmp[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", dir, name);
	FILE *f = fopen(tmp, "w");
	if (!f) {
		perror(tmp);
		exit(3);
	}
	fputs(text, f);
	if (fclose(f) != 0 || rename(tmp, path) != 0) {
		perror(path);
		exit(3);
	}
}

static void raise_nofile(void)
{
	struct rlimit r;
	if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
		r.rlim_cur = r.rlim_max;
		setrlimit(RLIMIT_NOFILE, &r);
	}
}

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

/* ------------------------------------------------------------ server --- */

static int server(int port, int want, const char *dir)
{
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	struct sockaddr_in a = loopback(port);
	socklen_t al = sizeof(a);
	if (l < 0 || setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, 4096) < 0 ||
	    getsockname(l, (struct sockaddr *)&a, &al) < 0) {
		perror("tcpmany server: listen");
		return 1;
	}
	char text[256];
	snprintf(text, sizeof(text), "pid=%d\nport=%d\n", getpid(), ntohs(a.sin_port));
	write_file(dir, "listen", text);

	size_t cap = (size_t)want + 16, n = 1;
	struct pollfd *p = calloc(cap, sizeof(*p));
	if (!p)
		return 1;
	p[0].fd = l;
	p[0].events = POLLIN;
	int accepted = 0, ready = 0;
	char buf[65536];
	for (;;) {
		if (!ready && accepted >= want) {
			snprintf(text, sizeof(text), "pid=%d\nport=%d\nconns=%d\n", getpid(), ntohs(a.sin_port), accepted);
			write_file(dir, "ready", text);
			ready = 1;
		}
		if (poll(p, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("tcpmany server: poll");
			return 1;
		}
		if (p[0].revents & POLLIN) {
			int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
			if (c >= 0) {
				if (n == cap) {
					cap *= 2;
					struct pollfd *q = realloc(p, cap * sizeof(*p));
					if (!q)
						return 1;
					p = q;
				}
				p[n].fd = c;
				p[n].events = POLLIN;
				p[n].revents = 0;
				n++;
				accepted++;
			} else if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
				perror("tcpmany server: accept");
			}
		}
		for (size_t i = 1; i < n; i++) {
			if (!p[i].revents)
				continue;
			ssize_t r = read(p[i].fd, buf, sizeof(buf));
			if (r < 0 && (errno == EINTR || errno == EAGAIN))
				continue;
			if (r <= 0) {
				close(p[i].fd);
				p[i] = p[--n];
				i--;
				continue;
			}
			for (ssize_t k = 0; k < r; k++)
				if (buf[k] >= 'a' && buf[k] <= 'z')
					buf[k] = (char)(buf[k] - 'a' + 'A');
			for (ssize_t off = 0; off < r;) {
				ssize_t w = write(p[i].fd, buf + off, (size_t)(r - off));
				if (w < 0 && errno == EINTR)
					continue;
				if (w <= 0)
					break;
				off += w;
			}
		}
	}
}

/* ------------------------------------------------------------ client --- */

static volatile sig_atomic_t want_check;

static void on_usr1(int sig)
{
	(void)sig;
	want_check = 1;
}

enum { ALIVE, DONE, EOF_, RESET, TIMEOUT, WRONG, DEAD };

static int client(int port, int n, const char *dir)
{
	int *fd = calloc((size_t)n + 1, sizeof(int));
	int *dead = calloc((size_t)n + 1, sizeof(int));
	struct pollfd *p = calloc((size_t)n + 1, sizeof(*p));
	int *idx = calloc((size_t)n + 1, sizeof(int));
	int *state = calloc((size_t)n + 1, sizeof(int));
	if (!fd || !dead || !p || !idx || !state)
		return 1;
	struct sockaddr_in a = loopback(port);
	int one = 1;
	for (int i = 0; i < n; i++) {
		fd[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd[i] < 0 || connect(fd[i], (struct sockaddr *)&a, sizeof(a)) < 0) {
			fprintf(stderr, "tcpmany client: connection %d: %s\n", i, strerror(errno));
			return 1;
		}
		setsockopt(fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	}
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigprocmask(SIG_BLOCK, &block, &old);
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigaction(SIGUSR1, &sa, NULL);
	char text[512];
	snprintf(text, sizeof(text), "pid=%d\nconns=%d\n", getpid(), n);
	write_file(dir, "client", text);

	for (int seq = 1;; seq++) {
		while (!want_check)
			sigsuspend(&old);
		want_check = 0;
		int np = 0, wrong = 0, eof = 0, reset = 0, timeout = 0, ok = 0, gone = 0;
		double t0 = now_ms(), last = t0;
		char letter = (char)('a' + (seq - 1) % 26);
		for (int i = 0; i < n; i++) {
			state[i] = ALIVE;
			if (dead[i]) {
				state[i] = DEAD;
				gone++;
				continue;
			}
			ssize_t w = send(fd[i], &letter, 1, MSG_NOSIGNAL);
			if (w != 1) {
				state[i] = (w < 0 && errno == EPIPE) ? EOF_ : RESET;
				continue;
			}
			p[np].fd = fd[i];
			p[np].events = POLLIN;
			idx[np++] = i;
		}
		int pending = np;
		while (pending > 0) {
			int left = (int)(t0 + CHECK_TIMEOUT_MS - now_ms());
			if (left <= 0)
				break;
			int r = poll(p, (nfds_t)np, left);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				break;
			for (int k = 0; k < np; k++) {
				if (!p[k].revents || p[k].fd < 0)
					continue;
				int i = idx[k];
				char c;
				ssize_t g = recv(fd[i], &c, 1, 0);
				if (g < 0 && (errno == EINTR || errno == EAGAIN))
					continue;
				if (g == 1)
					state[i] = c == letter - 'a' + 'A' ? DONE : WRONG;
				else
					state[i] = g == 0 ? EOF_ : RESET;
				last = now_ms();
				p[k].fd = -1; /* poll ignores negative descriptors */
				pending--;
			}
		}
		for (int i = 0; i < n; i++) {
			switch (state[i]) {
			case DONE:
				ok++;
				break;
			case ALIVE:
				timeout++;
				dead[i] = 1;
				break;
			case WRONG:
				wrong++;
				dead[i] = 1;
				break;
			case EOF_:
				eof++;
				dead[i] = 1;
				break;
			case RESET:
				reset++;
				dead[i] = 1;
				break;
			default:
				break;
			}
		}
		snprintf(text, sizeof(text), "seq=%d ok=%d of=%d eof=%d reset=%d timeout=%d wrong=%d dead=%d max_ms=%.3f\n",
			 seq, ok, n, eof, reset, timeout, wrong, gone, last - t0);
		write_file(dir, "check", text);
	}
}

int main(int argc, char **argv)
{
	if (argc != 5 || (strcmp(argv[1], "server") && strcmp(argv[1], "client"))) {
		fprintf(stderr, "usage: tcpmany server|client PORT N DIR\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	raise_nofile();
	int port = atoi(argv[2]), n = atoi(argv[3]);
	if (port < 0 || port > 65535 || n < 0) {
		fprintf(stderr, "tcpmany: bad PORT or N\n");
		return 2;
	}
	return strcmp(argv[1], "server") == 0 ? server(port, n, argv[4]) : client(port, n, argv[4]);
}
