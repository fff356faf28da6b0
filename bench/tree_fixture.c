/*
 * tree_fixture N SHARED_MIB PRIV_MIB READYFILE
 *
 * Process-tree fixture for bench/tree.sh.  All processes are single-threaded.
 *
 * The started process (the root; start it as a session leader with setsid,
 * stdin /dev/null, stdout/stderr to a regular file) closes every inherited
 * descriptor above 2, maps SHARED_MIB MiB of private anonymous memory
 * (MADV_NOHUGEPAGE, 4 KiB pages) and fills it with non-zero xorshift64 data.
 * Then it forks N-1 children, so the tree has N processes (N = 1: no
 * child).  Every child inherits that region copy-on-write and never writes
 * it, so its pages stay shared with the root.
 *
 * After the fork every process, the root included, maps PRIV_MIB MiB of its
 * own private anonymous memory (MADV_NOHUGEPAGE) and fills it with data that
 * differs per process (seed from the process index 0..N-1).
 *
 * Children report "index pid priv_sum" to the root through a pipe, then close
 * it; the root collects all of them and atomically (tmp file + rename) writes
 *
 *     pid=<root pid> n=<N> pids=<pid0>,<pid1>,... shared=<hex sum>
 *     sums=<priv sum of pid0>,<priv sum of pid1>,...\n
 *
 * (one line) to READYFILE.  pid0 is the root; the rest are its direct
 * children, in index order.  Afterwards no process holds a descriptor
 * besides 0/1/2, and all sleep in nanosleep(1 s) steps.
 *
 * SIGUSR1 (to any process) makes it re-checksum its shared and private
 * regions and write "pid=<pid> shared=<hex> priv=<hex>\n" atomically to
 * READYFILE.check.<pid>, so a harness can verify a restored tree.
 *
 * Checksums are FNV-1a over 64-bit words.  Build: gcc -O2 -o tree_fixture
 * tree_fixture.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_N 1024

static volatile sig_atomic_t want_check;

static void on_usr1(int sig)
{
	(void)sig;
	want_check = 1;
}

static uint64_t checksum(const uint64_t *p, size_t words)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < words; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static void fill(uint64_t *p, size_t words, uint64_t seed)
{
	uint64_t x = seed ? seed : 1;
	for (size_t i = 0; i < words; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = x;
	}
}

static uint64_t *map_region(size_t len)
{
	uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("tree_fixture: mmap");
		exit(1);
	}
	if (madvise(p, len, MADV_NOHUGEPAGE) < 0) {
		perror("tree_fixture: madvise(MADV_NOHUGEPAGE)");
		exit(1);
	}
	return p;
}

static int write_atomic(const char *path, const char *buf)
{
	char tmp[4200];
	int n = snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid());
	if (n < 0 || (size_t)n >= sizeof(tmp)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	size_t len = strlen(buf), off = 0;
	while (off < len) {
		ssize_t w = write(fd, buf + off, len - off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			close(fd);
			unlink(tmp);
			return -1;
		}
		off += (size_t)w;
	}
	if (close(fd) < 0 || rename(tmp, path) < 0) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

static unsigned long parse(const char *s, unsigned long max, const char *what)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || *s == '\0' || *end || v == 0 || v > max) {
		fprintf(stderr, "tree_fixture: bad %s '%s'\n", what, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s N SHARED_MIB PRIV_MIB READYFILE\n", argv[0]);
		return 2;
	}
	int n = (int)parse(argv[1], MAX_N, "N");
	size_t shared_len = parse(argv[2], 1UL << 20, "SHARED_MIB") << 20;
	size_t priv_len = parse(argv[3], 1UL << 20, "PRIV_MIB") << 20;
	const char *ready = argv[4];

	if (close_range(3, ~0U, 0) < 0) {
		for (int fd = 3; fd < 1024; fd++)
			close(fd);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) < 0) { /* inherited by the children */
		perror("tree_fixture: sigaction");
		return 1;
	}

	uint64_t *shared = map_region(shared_len);
	fill(shared, shared_len / 8, 0x9e3779b97f4a7c15ULL ^ (uint64_t)time(NULL));
	uint64_t shared_sum = checksum(shared, shared_len / 8);

	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0) {
		perror("tree_fixture: pipe");
		return 1;
	}
	static pid_t pids[MAX_N];
	static uint64_t sums[MAX_N];
	pids[0] = getpid();
	int idx = 0;
	for (int i = 1; i < n; i++) {
		pid_t c = fork();
		if (c < 0) {
			perror("tree_fixture: fork");
			return 1;
		}
		if (c == 0) {
			idx = i;
			break;
		}
		pids[i] = c;
	}

	uint64_t *priv = map_region(priv_len);
	fill(priv, priv_len / 8,
	     0xd1b54a32d192ed03ULL * (uint64_t)(idx + 1) ^ (uint64_t)time(NULL));
	uint64_t priv_sum = checksum(priv, priv_len / 8);

	if (idx != 0) {
		char rec[128];
		int len = snprintf(rec, sizeof(rec), "%d %d %016" PRIx64 "\n", idx,
				   (int)getpid(), priv_sum);
		close(p[0]);
		/* < PIPE_BUF: one atomic write */
		if (write(p[1], rec, (size_t)len) != len) {
			perror("tree_fixture: child write");
			return 1;
		}
		close(p[1]);
	} else {
		sums[0] = priv_sum;
		close(p[1]);
		FILE *f = fdopen(p[0], "r");
		if (!f) {
			perror("tree_fixture: fdopen");
			return 1;
		}
		int got = 0, ci, cp;
		uint64_t cs;
		while (got < n - 1 && fscanf(f, "%d %d %" SCNx64, &ci, &cp, &cs) == 3) {
			if (ci <= 0 || ci >= n || pids[ci] != cp) {
				fprintf(stderr, "tree_fixture: bad child record %d %d\n", ci, cp);
				return 1;
			}
			sums[ci] = cs;
			got++;
		}
		fclose(f);
		if (got != n - 1) {
			fprintf(stderr, "tree_fixture: %d of %d children reported\n", got, n - 1);
			return 1;
		}
		size_t cap = 64 + (size_t)n * 40, off = 0;
		char *line = malloc(cap);
		if (!line)
			return 1;
		off += (size_t)snprintf(line + off, cap - off, "pid=%d n=%d pids=", (int)pids[0], n);
		for (int i = 0; i < n; i++)
			off += (size_t)snprintf(line + off, cap - off, "%s%d", i ? "," : "", (int)pids[i]);
		off += (size_t)snprintf(line + off, cap - off, " shared=%016" PRIx64 " sums=", shared_sum);
		for (int i = 0; i < n; i++)
			off += (size_t)snprintf(line + off, cap - off, "%s%016" PRIx64, i ? "," : "", sums[i]);
		snprintf(line + off, cap - off, "\n");
		if (write_atomic(ready, line) < 0) {
			perror("tree_fixture: write READYFILE");
			return 1;
		}
		printf("tree_fixture: ready %s", line);
		free(line);
	}

	char check[4200];
	if ((size_t)snprintf(check, sizeof(check), "%s.check.%d", ready, (int)getpid()) >= sizeof(check)) {
		fprintf(stderr, "tree_fixture: READYFILE path too long\n");
		return 2;
	}
	for (;;) {
		if (want_check) {
			want_check = 0;
			char line[160];
			snprintf(line, sizeof(line), "pid=%d shared=%016" PRIx64 " priv=%016" PRIx64 "\n",
				 (int)getpid(), checksum(shared, shared_len / 8),
				 checksum(priv, priv_len / 8));
			if (write_atomic(check, line) < 0)
				perror("tree_fixture: write check file");
			continue;
		}
		struct timespec ts = { .tv_sec = 1, .tv_nsec = 0 };
		nanosleep(&ts, NULL);
	}
}
