/*
 * Physical baselines for the floe dump/restore benchmark (bench/run.sh).
 *
 *   baseline dump PID ADDR LEN OUTFILE
 *       SIGSTOP PID and wait until it is stopped; then (timed) copy LEN bytes
 *       at ADDR (hex, 0x optional) out of PID with process_vm_readv in
 *       16 MiB chunks into one reused, pre-faulted buffer, write(2)ing each
 *       chunk to OUTFILE (created/truncated); then (timed separately) one
 *       fsync(OUTFILE); then SIGCONT PID.
 *       Prints: copy_s=<secs> fsync_s=<secs> bytes=<n>
 *
 *   baseline restore LEN INFILE
 *       fill: (timed) mmap LEN bytes of fresh private anonymous memory
 *       (MADV_NOHUGEPAGE -> 4 KiB pages) and read(2) INFILE into it in
 *       16 MiB chunks directly into the mapping (page faults + copy from the
 *       page cache).  Then munmap (untimed) and
 *       touch: (timed) mmap LEN fresh bytes the same way and memset() them.
 *       Prints: fill_s=<secs> touch_s=<secs> bytes=<n>
 *
 *   baseline touch LEN
 *       Only the memset variant.  Prints: touch_s=<secs> bytes=<n>
 *
 * LEN accepts a plain byte count (decimal or 0x hex).
 * Build: gcc -O2 -o baseline baseline.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (16UL << 20)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
	fprintf(stderr, "baseline: %s: %s\n", what, strerror(errno));
	exit(1);
}

static unsigned long long parse_num(const char *s, int base, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, base);
	if (errno || *s == '\0' || *end) {
		fprintf(stderr, "baseline: bad %s '%s'\n", what, s);
		exit(2);
	}
	return v;
}

/* State letter from /proc/PID/stat, or 0 if the process is gone. */
static char proc_state(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	char *p = strrchr(buf, ')'); /* comm may contain spaces/parens */
	if (!p || p[1] != ' ')
		return 0;
	return p[2];
}

static void write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t w = write(fd, buf, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die("write");
		}
		buf += w;
		len -= (size_t)w;
	}
}

static int do_dump(pid_t pid, uintptr_t addr, size_t len, const char *out)
{
	int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		die("open OUTFILE");
	char *buf = malloc(CHUNK);
	if (!buf)
		die("malloc");
	memset(buf, 0, CHUNK); /* pre-fault the reused buffer (untimed) */

	if (kill(pid, SIGSTOP) < 0)
		die("kill(SIGSTOP)");
	for (int i = 0;; i++) {
		char st = proc_state(pid);
		if (st == 'T' || st == 't')
			break;
		if (st == 0 || i > 5000) {
			fprintf(stderr, "baseline: pid %d did not stop (state %c)\n",
				(int)pid, st ? st : '?');
			kill(pid, SIGCONT);
			return 1;
		}
		usleep(1000);
	}

	double t0 = now();
	size_t done = 0;
	while (done < len) {
		size_t want = len - done < CHUNK ? len - done : CHUNK;
		size_t got = 0;
		while (got < want) {
			struct iovec local = { buf + got, want - got };
			struct iovec remote = { (void *)(addr + done + got), want - got };
			ssize_t r = process_vm_readv(pid, &local, 1, &remote, 1, 0);
			if (r < 0) {
				if (errno == EINTR)
					continue;
				int e = errno;
				kill(pid, SIGCONT);
				errno = e;
				die("process_vm_readv");
			}
			if (r == 0) {
				kill(pid, SIGCONT);
				fprintf(stderr, "baseline: process_vm_readv returned 0 at offset %zu\n",
					done + got);
				return 1;
			}
			got += (size_t)r;
		}
		write_all(fd, buf, want);
		done += want;
	}
	double t1 = now();
	if (fsync(fd) < 0)
		die("fsync");
	double t2 = now();
	kill(pid, SIGCONT);
	if (close(fd) < 0)
		die("close");
	free(buf);
	printf("copy_s=%.6f fsync_s=%.6f bytes=%zu\n", t1 - t0, t2 - t1, len);
	return 0;
}

static char *fresh(size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	if (madvise(p, len, MADV_NOHUGEPAGE) < 0)
		die("madvise(MADV_NOHUGEPAGE)");
	return p;
}

static double touch(size_t len)
{
	double t0 = now();
	char *p = fresh(len);
	memset(p, 0x5a, len);
	double t1 = now();
	/* keep the compiler from eliding the memset */
	if (((volatile char *)p)[len - 1] != 0x5a)
		abort();
	munmap(p, len);
	return t1 - t0;
}

static int do_restore(size_t len, const char *in)
{
	int fd = open(in, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open INFILE");

	double t0 = now();
	char *p = fresh(len);
	size_t done = 0;
	while (done < len) {
		size_t want = len - done < CHUNK ? len - done : CHUNK;
		ssize_t r = read(fd, p + done, want);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			die("read");
		}
		if (r == 0) {
			fprintf(stderr, "baseline: INFILE shorter than LEN (%zu < %zu)\n",
				done, len);
			return 1;
		}
		done += (size_t)r;
	}
	double t1 = now();
	close(fd);
	munmap(p, len);

	double ts = touch(len);
	printf("fill_s=%.6f touch_s=%.6f bytes=%zu\n", t1 - t0, ts, len);
	return 0;
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s dump PID ADDR LEN OUTFILE\n"
		"       %s restore LEN INFILE\n"
		"       %s touch LEN\n",
		argv0, argv0, argv0);
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage(argv[0]);
	if (!strcmp(argv[1], "dump") && argc == 6) {
		pid_t pid = (pid_t)parse_num(argv[2], 10, "PID");
		uintptr_t addr = (uintptr_t)parse_num(argv[3], 16, "ADDR");
		size_t len = (size_t)parse_num(argv[4], 0, "LEN");
		if (!len)
			usage(argv[0]);
		return do_dump(pid, addr, len, argv[5]);
	}
	if (!strcmp(argv[1], "restore") && argc == 4) {
		size_t len = (size_t)parse_num(argv[2], 0, "LEN");
		if (!len)
			usage(argv[0]);
		return do_restore(len, argv[3]);
	}
	if (!strcmp(argv[1], "touch") && argc == 3) {
		size_t len = (size_t)parse_num(argv[2], 0, "LEN");
		if (!len)
			usage(argv[0]);
		printf("touch_s=%.6f bytes=%zu\n", touch(len), len);
		return 0;
	}
	usage(argv[0]);
}
