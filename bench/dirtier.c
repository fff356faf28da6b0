/*
 * dirtier MIB DIR
 *
 * Fixture of bench/incremental.sh (incremental pre-dumps and dirty-page
 * trackers).  Single-threaded.  Maps MIB MiB of private anonymous memory
 * (4 KiB pages: MADV_NOHUGEPAGE), fills every page with non-zero data that
 * is distinct per page, then atomically (tmp file + rename) writes
 *
 *     pid=<pid> addr=<hex start> len=<bytes> pages=<n> fill_ns_per_page=<x>\n
 *
 * to DIR/ready and idles.  It closes every inherited descriptor above 2 and
 * holds none open besides 0/1/2 while idle.
 *
 * Control (no FIFO, no signal): every 10 ms it reads DIR/ctl, one line
 *
 *     SEQ CMD [ARG]
 *
 * and runs the command when SEQ is larger than the last one it ran (write the
 * file atomically: tmp + rename).  When done it atomically writes DIR/result:
 *
 *     seq=SEQ cmd=CMD arg=ARG pages=K ns=<total> ns_per_page=<x>\n
 *
 * Commands (all write as fast as they can, timed with CLOCK_MONOTONIC):
 *   dirty P      rewrite exactly round(pages * P / 100) distinct pages chosen
 *                at random (a keyed pseudo-random permutation of the page
 *                indices, no index array: nothing but the chosen pages and the
 *                stack is written), each page whole (512 64-bit words), in
 *                the permutation's order.  P is a decimal, 0 <= P <= 100.
 *   sweep page   steady writer: rewrite every page whole, in address order.
 *   sweep word   steady writer: one 64-bit store per page, in address order
 *                (isolates the per-page cost of a tracked first write).
 *   sum          FNV-1a checksum of the region (reported as sum=<hex>).
 *   quit         exit(0).
 * Every write changes the page's content (a per-command generation number is
 * mixed in), so content-comparing trackers see each written page as changed
 * and no two written pages are identical (no content deduplication).
 *
 * Start it with setsid, stdin /dev/null, stdout/stderr to a file.
 * Build: gcc -O2 -o dirtier dirtier.c
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <math.h>

/* relative to this file, so no -I is needed wherever it is compiled from */
#include "../tests/fixtures/common.h"

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static uint64_t *mem;
static uint64_t npages;
static uint64_t gen; /* bumped by every writing command */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t splitmix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* Page i gets words base + j*K: distinct per (generation, page), never 0
 * for the first word, cheap enough to run at memory bandwidth. */
static inline void write_page(uint64_t i)
{
	uint64_t *p = mem + i * WORDS;
	uint64_t base = splitmix(gen * 0x100000001b3ULL ^ i) | 1;
	for (uint64_t j = 0; j < WORDS; j++)
		p[j] = base + j * 0x9e3779b97f4a7c15ULL;
}

/* A bijection of [0, 2^bits), keyed: odd multiply, add, xorshift-right. */
struct perm {
	uint64_t mask, a, b, c;
	unsigned s1, s2;
};

static uint64_t perm_step(const struct perm *p, uint64_t x)
{
	x = (x * p->a + p->b) & p->mask;
	x ^= x >> p->s1;
	x = (x * p->c) & p->mask;
	x ^= x >> p->s2;
	return x;
}

/* Cycle walking: a bijection of [0, n) when the domain is [0, 2^bits >= n). */
static uint64_t perm_at(const struct perm *p, uint64_t i, uint64_t n)
{
	uint64_t x = perm_step(p, i);
	while (x >= n)
		x = perm_step(p, x);
	return x;
}

static struct perm perm_new(uint64_t n, uint64_t key)
{
	unsigned bits = 1;
	while ((1ULL << bits) < n)
		bits++;
	struct perm p = {
		.mask = (1ULL << bits) - 1,
		.a = splitmix(key) | 1,
		.b = splitmix(key + 1),
		.c = splitmix(key + 2) | 1,
		.s1 = bits / 2 + 1,
		.s2 = bits / 3 + 1,
	};
	return p;
}

/* Reads "SEQ CMD [ARG]" from path; 0 on success. */
static int read_ctl(const char *path, uint64_t *seq, char *cmd, size_t cmdlen, char *arg, size_t arglen)
{
	char buf[256];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	char c[32] = "", a[64] = "";
	unsigned long long s;
	int got = sscanf(buf, "%llu %31s %63s", &s, c, a);
	if (got < 2)
		return -1;
	*seq = s;
	snprintf(cmd, cmdlen, "%s", c);
	snprintf(arg, arglen, "%s", got == 3 ? a : "-");
	return 0;
}

int main(int argc, char **argv)
{
	fx_name = "dirtier";
	if (argc != 3) {
		fprintf(stderr, "usage: %s MIB DIR\n", argv[0]);
		return 2;
	}
	unsigned long mib = parse_ulong(argv[1], 1UL << 20, "dirtier", "MIB");
	close_fds_above_2();
	char ready[4096], ctl[4096], result[4096];
	if ((size_t)snprintf(ready, sizeof(ready), "%s/ready", argv[2]) >= sizeof(ready) ||
	    (size_t)snprintf(ctl, sizeof(ctl), "%s/ctl", argv[2]) >= sizeof(ctl) ||
	    (size_t)snprintf(result, sizeof(result), "%s/result", argv[2]) >= sizeof(result)) {
		fprintf(stderr, "dirtier: DIR path too long\n");
		return 2;
	}

	size_t len = (size_t)mib << 20;
	npages = len / PAGE;
	mem = map_anon_nohuge(len, "dirtier");
	uint64_t t0 = now_ns();
	for (uint64_t i = 0; i < npages; i++)
		write_page(i);
	uint64_t fill = now_ns() - t0;

	char line[512];
	snprintf(line, sizeof(line), "pid=%d addr=%" PRIxPTR " len=%zu pages=%" PRIu64 " fill_ns_per_page=%.1f\n",
		 (int)getpid(), (uintptr_t)mem, len, npages, (double)fill / (double)npages);
	if (write_str_atomic(ready, line) < 0) {
		perror("dirtier: writing READY");
		return 1;
	}

	uint64_t last = 0;
	const struct timespec tick = { 0, 10 * 1000 * 1000 };
	for (;;) {
		nanosleep(&tick, NULL);
		uint64_t seq;
		char cmd[32], arg[64];
		if (read_ctl(ctl, &seq, cmd, sizeof(cmd), arg, sizeof(arg)) < 0 || seq <= last)
			continue;
		last = seq;
		uint64_t k = 0, ns = 0, sum = 0;
		int ok = 1, with_sum = 0;
		if (strcmp(cmd, "dirty") == 0) {
			char *end;
			double p = strtod(arg, &end);
			if (*end || !(p >= 0 && p <= 100)) {
				ok = 0;
			} else {
				k = (uint64_t)llround((double)npages * p / 100.0);
				gen++;
				struct perm pm = perm_new(npages, gen * 0x51ed2701ULL ^ (uint64_t)getpid());
				uint64_t t = now_ns();
				for (uint64_t i = 0; i < k; i++)
					write_page(perm_at(&pm, i, npages));
				ns = now_ns() - t;
			}
		} else if (strcmp(cmd, "sweep") == 0 && strcmp(arg, "page") == 0) {
			gen++;
			k = npages;
			uint64_t t = now_ns();
			for (uint64_t i = 0; i < npages; i++)
				write_page(i);
			ns = now_ns() - t;
		} else if (strcmp(cmd, "sweep") == 0 && strcmp(arg, "word") == 0) {
			gen++;
			k = npages;
			uint64_t v = splitmix(gen) | 1;
			volatile uint64_t *m = mem;
			uint64_t t = now_ns();
			for (uint64_t i = 0; i < npages; i++)
				m[i * WORDS + 1] += v;
			ns = now_ns() - t;
		} else if (strcmp(cmd, "sum") == 0) {
			uint64_t t = now_ns();
			sum = fnv1a_words(mem, npages * WORDS);
			ns = now_ns() - t;
			k = npages;
			with_sum = 1;
		} else if (strcmp(cmd, "quit") == 0) {
			return 0;
		} else {
			ok = 0;
		}
		if (!ok) {
			snprintf(line, sizeof(line), "seq=%" PRIu64 " cmd=%s arg=%s error=bad-command\n", seq, cmd, arg);
		} else {
			int n = snprintf(line, sizeof(line),
					 "seq=%" PRIu64 " cmd=%s arg=%s pages=%" PRIu64 " ns=%" PRIu64 " ns_per_page=%.1f",
					 seq, cmd, arg, k, ns, k ? (double)ns / (double)k : 0.0);
			if (with_sum)
				snprintf(line + n, sizeof(line) - (size_t)n, " sum=%" PRIx64, sum);
			strncat(line, "\n", sizeof(line) - strlen(line) - 1);
		}
		if (write_str_atomic(result, line) < 0)
			perror("dirtier: writing RESULT");
	}
}
