/*
 * linux-test-helper: what the Linux tests need in the guest and busybox lacks.
 * Built static by build-test-kernel.sh (`gcc -static -O2`) into the test
 * initramfs as /bin/linux-test-helper. Every system call costs about a
 * millisecond where the guest kernel runs emulated, so the loops below make
 * few of them and do their work in user space.
 *
 *   linux-test-helper memloop MIB STATUS
 *       Writes a pattern over MIB MiB and checks it forever: each pass checks
 *       every 8-byte word holds what the previous pass wrote, then writes the
 *       next generation, then sleeps 20 ms (so the guest's other work and a
 *       second guest on the host get CPU time). About once a second it replaces the file STATUS with
 *       one line:
 *         memloop gen=<passes> errors=<bad words> clock_errors=<n>
 *                 mono_ms=<CLOCK_MONOTONIC> real_s=<CLOCK_REALTIME> max_gap_ms=<n>
 *                 first_error=<page>:<word>:<expected>:<found> (or -)
 *       clock_errors counts CLOCK_MONOTONIC going backwards; max_gap_ms is the
 *       longest time between two passes (a migration's pause shows there).
 *   linux-test-helper fill MIB
 *       Maps MIB MiB, writes every page and exits: the pages go back to the
 *       guest's free lists resident in the host (a balloon then takes pages
 *       whose host memory really is freed).
 *   linux-test-helper tcp-echo HOST PORT
 *       Connects to HOST:PORT (IPv4) and sends back every byte it receives
 *       until the peer closes.
 *   linux-test-helper tcp-send HOST PORT FILE
 *   linux-test-helper tcp-recv HOST PORT FILE
 *       Connects to HOST:PORT and sends FILE, or writes what arrives until the
 *       peer closes into FILE, 64 KiB per system call (busybox nc moves 1 KiB
 *       per call, a segment each, and takes minutes for a few MiB here).
 *   linux-test-helper pattern MIB SEED
 *       Writes MIB MiB of pseudo-random bytes (xorshift64 from SEED) to
 *       stdout: test data made in user space, where /dev/urandom would take
 *       the emulated kernel about a minute per MiB.
 *   linux-test-helper zeroout DEVICE OFFSET LENGTH
 *       BLKZEROOUT: virtio-blk WRITE_ZEROES without the unmap flag.
 *   linux-test-helper punch DEVICE OFFSET LENGTH
 *       fallocate(PUNCH_HOLE | KEEP_SIZE) on a block device: WRITE_ZEROES
 *       with the unmap flag (the host may deallocate).
 * Exit status 0 on success, 1 with a message on stderr otherwise.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int fail(const char *what)
{
	fprintf(stderr, "linux-test-helper: %s: %s\n", what, strerror(errno));
	return 1;
}

static uint64_t now_ms(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* The word `i` of generation `gen`: differs per word, per page and per pass. */
static inline uint64_t pattern(uint64_t gen, uint64_t i)
{
	return (gen * 0x9e3779b97f4a7c15ull) ^ (i * 0xbf58476d1ce4e5b9ull) ^ i;
}

static void write_status(const char *path, const char *line)
{
	char tmp[4096];
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return;
	if (write(fd, line, strlen(line)) == (ssize_t)strlen(line))
		rename(tmp, path);
	close(fd);
}

static int memloop(const char *mib_text, const char *status)
{
	uint64_t words = strtoull(mib_text, NULL, 10) << 17; /* MiB / 8 bytes */
	uint64_t gen = 0, errors = 0, clock_errors = 0, max_gap = 0;
	uint64_t last_pass, last_status = 0;
	const struct timespec pause = { .tv_nsec = 20 * 1000 * 1000 };
	char first_error[160] = "-";
	volatile uint64_t *mem;

	if (words == 0) {
		fprintf(stderr, "linux-test-helper: memloop: MIB must be a positive number\n");
		return 1;
	}
	mem = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
		   -1, 0);
	if (mem == MAP_FAILED)
		return fail("mmap");
	for (uint64_t i = 0; i < words; i++)
		mem[i] = pattern(0, i);
	last_pass = now_ms(CLOCK_MONOTONIC);
	for (;;) {
		uint64_t now, real;
		char line[512];

		for (uint64_t i = 0; i < words; i++) {
			uint64_t want = pattern(gen, i), got = mem[i];

			if (got != want) {
				if (errors++ == 0)
					snprintf(first_error, sizeof(first_error),
						 "%llu:%llu:%016llx:%016llx",
						 (unsigned long long)(i >> 9),
						 (unsigned long long)(i & 511),
						 (unsigned long long)want, (unsigned long long)got);
			}
			mem[i] = pattern(gen + 1, i);
		}
		gen++;
		nanosleep(&pause, NULL);
		now = now_ms(CLOCK_MONOTONIC);
		if (now < last_pass)
			clock_errors++;
		else if (now - last_pass > max_gap)
			max_gap = now - last_pass;
		last_pass = now;
		if (now - last_status < 1000 && gen > 1)
			continue;
		last_status = now;
		real = now_ms(CLOCK_REALTIME) / 1000;
		snprintf(line, sizeof(line),
			 "memloop gen=%llu errors=%llu clock_errors=%llu mono_ms=%llu real_s=%llu "
			 "max_gap_ms=%llu first_error=%s\n",
			 (unsigned long long)gen, (unsigned long long)errors,
			 (unsigned long long)clock_errors, (unsigned long long)now,
			 (unsigned long long)real, (unsigned long long)max_gap, first_error);
		write_status(status, line);
	}
}

static int fill(const char *mib_text)
{
	size_t bytes = strtoull(mib_text, NULL, 10) << 20;
	char *mem;

	if (bytes == 0) {
		fprintf(stderr, "linux-test-helper: fill: MIB must be a positive number\n");
		return 1;
	}
	mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
		   -1, 0);
	if (mem == MAP_FAILED)
		return fail("mmap");
	for (size_t i = 0; i < bytes; i += 4096)
		mem[i] = 1;
	return 0;
}

/* A TCP connection to HOST:PORT (IPv4), or -1 with a message. */
static int tcp_connect(const char *host, const char *port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	int fd;

	addr.sin_port = htons((uint16_t)atoi(port));
	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
		fprintf(stderr, "linux-test-helper: %s is not an IPv4 address\n", host);
		return -1;
	}
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) {
		fail("socket");
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fail("connect");
		close(fd);
		return -1;
	}
	return fd;
}

/* Writes all n bytes of buf to fd. */
static int write_all(int fd, const char *buf, size_t n)
{
	size_t off = 0;

	while (off < n) {
		ssize_t w = write(fd, buf + off, n - off);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return fail("write");
		}
		off += (size_t)w;
	}
	return 0;
}

/* Copies from `in` to `out` until `in` ends. */
static int copy(int in, int out)
{
	static char buf[65536];

	for (;;) {
		ssize_t n = read(in, buf, sizeof(buf));

		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail("read");
		}
		if (write_all(out, buf, (size_t)n))
			return 1;
	}
}

static int tcp_echo(const char *host, const char *port)
{
	int fd = tcp_connect(host, port);

	return fd < 0 ? 1 : copy(fd, fd);
}

static int tcp_file(const char *op, const char *host, const char *port, const char *path)
{
	int sending = strcmp(op, "tcp-send") == 0;
	int file = sending ? open(path, O_RDONLY) : open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	int fd, rc;

	if (file < 0)
		return fail(path);
	fd = tcp_connect(host, port);
	if (fd < 0)
		return 1;
	rc = sending ? copy(file, fd) : copy(fd, file);
	if (close(fd) < 0 || close(file) < 0)
		return fail("close");
	return rc;
}

static int random_pattern(const char *mib_text, const char *seed_text)
{
	static uint64_t buf[8192];
	uint64_t mib = strtoull(mib_text, NULL, 10), x = strtoull(seed_text, NULL, 0) | 1;

	for (uint64_t chunk = 0; chunk < mib * 16; chunk++) {
		for (size_t i = 0; i < 8192; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			buf[i] = x;
		}
		if (write_all(1, (const char *)buf, sizeof(buf)))
			return 1;
	}
	return 0;
}

static int block_range(const char *op, const char *dev, const char *off, const char *len)
{
	uint64_t range[2] = { strtoull(off, NULL, 0), strtoull(len, NULL, 0) };
	int fd = open(dev, O_RDWR);

	if (fd < 0)
		return fail(dev);
	if (strcmp(op, "zeroout") == 0) {
		if (ioctl(fd, BLKZEROOUT, range) < 0)
			return fail("BLKZEROOUT");
	} else if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)range[0],
			     (off_t)range[1]) < 0) {
		return fail("fallocate(PUNCH_HOLE)");
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "memloop") == 0)
		return memloop(argv[2], argv[3]);
	if (argc == 3 && strcmp(argv[1], "fill") == 0)
		return fill(argv[2]);
	if (argc == 4 && strcmp(argv[1], "tcp-echo") == 0)
		return tcp_echo(argv[2], argv[3]);
	if (argc == 5 && (strcmp(argv[1], "tcp-send") == 0 || strcmp(argv[1], "tcp-recv") == 0))
		return tcp_file(argv[1], argv[2], argv[3], argv[4]);
	if (argc == 4 && strcmp(argv[1], "pattern") == 0)
		return random_pattern(argv[2], argv[3]);
	if (argc == 5 && (strcmp(argv[1], "zeroout") == 0 || strcmp(argv[1], "punch") == 0))
		return block_range(argv[1], argv[2], argv[3], argv[4]);
	fprintf(stderr, "usage: linux-test-helper memloop MIB STATUS | fill MIB | tcp-echo HOST PORT |\n"
			"       tcp-send HOST PORT FILE | tcp-recv HOST PORT FILE | pattern MIB SEED |\n"
			"       zeroout DEVICE OFFSET LENGTH | punch DEVICE OFFSET LENGTH\n");
	return 2;
}
