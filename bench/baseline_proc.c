/*
 * Whole-process physical dump baseline for bench/redis.sh.
 *
 *   baseline_proc dump PID OUTFILE
 *
 * SIGSTOP PID and wait until every thread of it is stopped (untimed, mirrors
 * a frozen dump).  Then, timed:
 *
 *   scan:  read /proc/PID/maps and, for every readable private mapping
 *          except [vvar]/[vvar_vclock]/[vdso]/[vsyscall], find its data
 *          pages with the PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux
 *          6.7+): present or swapped pages that are not the shared zero
 *          page; in file-backed private mappings only the pages modified
 *          privately (copy-on-write, i.e. not PAGE_IS_FILE).  That is the
 *          set of pages any checkpointer has to save (shared mappings are
 *          left out: redis has none).
 *   copy:  copy those pages out of PID with process_vm_readv (up to 1024
 *          ranges per call) in 16 MiB chunks into one reused, pre-faulted
 *          buffer, write(2)ing each chunk to OUTFILE (created/truncated).
 *   fsync: one fsync(OUTFILE).
 *
 * Then SIGCONT PID.
 * Prints: scan_s=<s> copy_s=<s> fsync_s=<s> bytes=<n> anon_bytes=<n>
 *         cow_bytes=<n> ranges=<n> vmas=<n>
 * (bytes = anon_bytes + cow_bytes; feed it as LEN to `baseline restore`.)
 *
 * Build: gcc -O2 -o baseline_proc baseline_proc.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (16UL << 20)
#define MAX_IOV 1024
#define PAGE 4096UL

/* PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7+), spelled out so that
 * older userspace headers do not matter. */
#define PAGE_IS_FILE (1ULL << 2)
#define PAGE_IS_PRESENT (1ULL << 3)
#define PAGE_IS_SWAPPED (1ULL << 4)
#define PAGE_IS_PFNZERO (1ULL << 5)
struct page_region {
	uint64_t start, end, categories;
};
struct pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)

struct range {
	uint64_t addr, len;
};

static struct range *ranges;
static size_t nranges, cap;
static pid_t target;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
	int e = errno;
	if (target > 0)
		kill(target, SIGCONT);
	fprintf(stderr, "baseline_proc: %s: %s\n", what, strerror(e));
	exit(1);
}

static void add_range(uint64_t a, uint64_t len)
{
	if (nranges && ranges[nranges - 1].addr + ranges[nranges - 1].len == a) {
		ranges[nranges - 1].len += len;
		return;
	}
	if (nranges == cap) {
		cap = cap ? cap * 2 : 1024;
		ranges = realloc(ranges, cap * sizeof(*ranges));
		if (!ranges)
			die("realloc");
	}
	ranges[nranges].addr = a;
	ranges[nranges].len = len;
	nranges++;
}

/* Appends the data pages of [start, end) to ranges; returns their bytes. */
static uint64_t scan(int pagemap, uint64_t start, uint64_t end, int file_backed)
{
	static struct page_region vec[4096];
	uint64_t bytes = 0, cur = start;
	uint64_t excl = PAGE_IS_PFNZERO | (file_backed ? PAGE_IS_FILE : 0);
	while (cur < end) {
		struct pm_scan_arg a = {
			.size = sizeof(a),
			.start = cur,
			.end = end,
			.vec = (uint64_t)(uintptr_t)vec,
			.vec_len = sizeof(vec) / sizeof(vec[0]),
			.category_inverted = excl,
			.category_mask = excl,
			.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
			.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
		};
		long n = ioctl(pagemap, PAGEMAP_SCAN, &a);
		if (n < 0)
			die("ioctl(PAGEMAP_SCAN) (needs Linux 6.7+)");
		for (long i = 0; i < n; i++) {
			add_range(vec[i].start, vec[i].end - vec[i].start);
			bytes += vec[i].end - vec[i].start;
		}
		if (a.walk_end <= cur)
			break;
		cur = a.walk_end;
	}
	return bytes;
}

static int all_stopped(pid_t pid)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	DIR *d = opendir(path);
	if (!d)
		return -1;
	int ok = 1;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char sp[320], buf[512];
		snprintf(sp, sizeof(sp), "/proc/%d/task/%s/stat", (int)pid, e->d_name);
		int fd = open(sp, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (n <= 0)
			continue;
		buf[n] = 0;
		char *p = strrchr(buf, ')');
		if (!p || p[1] != ' ' || (p[2] != 'T' && p[2] != 't'))
			ok = 0;
	}
	closedir(d);
	return ok;
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

int main(int argc, char **argv)
{
	if (argc != 4 || strcmp(argv[1], "dump")) {
		fprintf(stderr, "usage: %s dump PID OUTFILE\n", argv[0]);
		return 2;
	}
	char *end;
	long pidl = strtol(argv[2], &end, 10);
	if (*end || pidl <= 0) {
		fprintf(stderr, "baseline_proc: bad PID '%s'\n", argv[2]);
		return 2;
	}
	pid_t pid = (pid_t)pidl;

	int out = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (out < 0)
		die("open OUTFILE");
	char *buf = malloc(CHUNK);
	if (!buf)
		die("malloc");
	memset(buf, 0, CHUNK); /* pre-fault (untimed) */
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)pid);
	int pagemap = open(path, O_RDONLY | O_CLOEXEC);
	if (pagemap < 0)
		die("open pagemap");
	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);

	if (kill(pid, SIGSTOP) < 0)
		die("kill(SIGSTOP)");
	target = pid;
	for (int i = 0;; i++) {
		int st = all_stopped(pid);
		if (st == 1)
			break;
		if (st < 0 || i > 5000) {
			errno = st < 0 ? ESRCH : ETIMEDOUT;
			die("waiting for the process to stop");
		}
		usleep(1000);
	}

	/* ---- scan ---- */
	double t0 = now();
	FILE *maps = fopen(path, "re");
	if (!maps)
		die("open maps");
	char line[4096];
	uint64_t anon = 0, cow = 0;
	int vmas = 0;
	while (fgets(line, sizeof(line), maps)) {
		unsigned long long s, e, off;
		char perms[8], dev[16];
		unsigned long ino;
		int n = 0;
		if (sscanf(line, "%llx-%llx %7s %llx %15s %lu %n", &s, &e, perms, &off, dev, &ino, &n) < 6)
			continue;
		char *name = line + n;
		name[strcspn(name, "\n")] = 0;
		if (perms[0] != 'r' || perms[3] != 'p')
			continue;
		if (!strcmp(name, "[vvar]") || !strcmp(name, "[vvar_vclock]") ||
		    !strcmp(name, "[vdso]") || !strcmp(name, "[vsyscall]"))
			continue;
		int file_backed = ino != 0;
		uint64_t b = scan(pagemap, s, e, file_backed);
		if (file_backed)
			cow += b;
		else
			anon += b;
		vmas++;
	}
	fclose(maps);

	/* ---- copy ---- */
	double t1 = now();
	size_t ri = 0;
	uint64_t roff = 0; /* offset inside ranges[ri] */
	while (ri < nranges) {
		struct iovec remote[MAX_IOV];
		int nio = 0;
		size_t fill = 0;
		size_t rj = ri;
		uint64_t ro = roff;
		while (rj < nranges && nio < MAX_IOV && fill < CHUNK) {
			uint64_t take = ranges[rj].len - ro;
			if (take > CHUNK - fill)
				take = CHUNK - fill;
			remote[nio].iov_base = (void *)(uintptr_t)(ranges[rj].addr + ro);
			remote[nio].iov_len = take;
			nio++;
			fill += take;
			ro += take;
			if (ro == ranges[rj].len) {
				rj++;
				ro = 0;
			}
		}
		size_t got = 0;
		int first = 0;
		while (got < fill) {
			struct iovec local = { buf + got, fill - got };
			ssize_t r = process_vm_readv(pid, &local, 1, remote + first, (unsigned long)(nio - first), 0);
			if (r < 0) {
				if (errno == EINTR)
					continue;
				die("process_vm_readv");
			}
			if (r == 0) {
				errno = EFAULT;
				die("process_vm_readv returned 0");
			}
			got += (size_t)r;
			/* skip the iovecs fully read, trim a partly read one */
			size_t left = (size_t)r;
			while (left && first < nio) {
				if (left >= remote[first].iov_len) {
					left -= remote[first].iov_len;
					first++;
				} else {
					remote[first].iov_base = (char *)remote[first].iov_base + left;
					remote[first].iov_len -= left;
					left = 0;
				}
			}
		}
		write_all(out, buf, fill);
		ri = rj;
		roff = ro;
	}
	double t2 = now();
	if (fsync(out) < 0)
		die("fsync");
	double t3 = now();
	kill(pid, SIGCONT);
	if (close(out) < 0)
		die("close");
	printf("scan_s=%.6f copy_s=%.6f fsync_s=%.6f bytes=%llu anon_bytes=%llu cow_bytes=%llu ranges=%zu vmas=%d\n",
	       t1 - t0, t2 - t1, t3 - t2, (unsigned long long)(anon + cow),
	       (unsigned long long)anon, (unsigned long long)cow, nranges, vmas);
	return 0;
}
