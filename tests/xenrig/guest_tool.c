/* Runs in the test domU (static binary in its initramfs). Writes blocks whose content names
 * (seed, seq, block), so dom0 can later check what the guest wrote (tests/xenrig/pattern.py
 * builds the same bytes), and prints one console line per completed write or tick.
 *
 *   guest-tool pattern  SEED DEV START COUNT              blocks START.. written once (seq 0)
 *   guest-tool workload SEED DEV START COUNT INTERVAL_MS  forever: seq 1,2,.. to block
 *                                                         START + (seq-1) % COUNT; DEV "-" = ticks only
 *
 * Block format (4096 bytes): the 32-byte record "XENRIG01" seed seq block (little-endian
 * u64) repeated 128 times. Writes use O_DIRECT|O_DSYNC: a printed ACK means the write
 * completed on the backend, i.e. it is acknowledged to the guest. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BS 4096

static uint64_t now(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fill(unsigned char *buf, uint64_t seed, uint64_t seq, uint64_t block) {
    unsigned char rec[32];
    memcpy(rec, "XENRIG01", 8);
    memcpy(rec + 8, &seed, 8);
    memcpy(rec + 16, &seq, 8);
    memcpy(rec + 24, &block, 8);
    for (int i = 0; i < BS / 32; i++) memcpy(buf + 32 * i, rec, 32);
}

static int open_dev(const char *dev) {
    int fd = open(dev, O_WRONLY | O_DIRECT | O_DSYNC);
    if (fd < 0) { printf("XENRIG-ERROR open %s: %m\n", dev); exit(2); }
    return fd;
}

static void put(int fd, unsigned char *buf, uint64_t block) {
    ssize_t n = pwrite(fd, buf, BS, (off_t)(block * BS));
    if (n != BS) { printf("XENRIG-ERROR write block %llu: %zd %m\n", (unsigned long long)block, n); exit(3); }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned char *buf;
    if (posix_memalign((void **)&buf, BS, BS)) return 1;
    if (argc == 6 && !strcmp(argv[1], "pattern")) {
        uint64_t seed = strtoull(argv[2], 0, 0), start = strtoull(argv[4], 0, 0), count = strtoull(argv[5], 0, 0);
        int fd = open_dev(argv[3]);
        for (uint64_t b = start; b < start + count; b++) { fill(buf, seed, 0, b); put(fd, buf, b); }
        close(fd);
        printf("XENRIG-PATTERN seed=%llu start=%llu count=%llu\n", (unsigned long long)seed,
               (unsigned long long)start, (unsigned long long)count);
        return 0;
    }
    if (argc == 7 && !strcmp(argv[1], "workload")) {
        uint64_t seed = strtoull(argv[2], 0, 0), start = strtoull(argv[4], 0, 0), count = strtoull(argv[5], 0, 0);
        long interval_ms = strtol(argv[6], 0, 0);
        int fd = strcmp(argv[3], "-") ? open_dev(argv[3]) : -1;
        uint64_t last_mono = now(CLOCK_MONOTONIC), last_real = now(CLOCK_REALTIME);
        struct timespec pause = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
        printf("XENRIG-WORKLOAD seed=%llu start=%llu count=%llu interval_ms=%ld\n", (unsigned long long)seed,
               (unsigned long long)start, (unsigned long long)count, interval_ms);
        for (uint64_t seq = 1;; seq++) {
            uint64_t block = start + (count ? (seq - 1) % count : 0);
            if (fd >= 0) { fill(buf, seed, seq, block); put(fd, buf, block); }
            uint64_t mono = now(CLOCK_MONOTONIC), real = now(CLOCK_REALTIME);
            printf("XENRIG-ACK %llu %llu %llu %llu\n", (unsigned long long)seq, (unsigned long long)block,
                   (unsigned long long)mono, (unsigned long long)real);
            /* the guest's own view of a stall: consecutive iterations far apart */
            if (mono - last_mono > 100000000ull || real - last_real > 100000000ull)
                printf("XENRIG-GAP %llu %llu %llu\n", (unsigned long long)seq,
                       (unsigned long long)(mono - last_mono), (unsigned long long)(real - last_real));
            last_mono = mono;
            last_real = real;
            nanosleep(&pause, 0);
        }
    }
    fprintf(stderr, "usage: guest-tool pattern SEED DEV START COUNT | workload SEED DEV START COUNT INTERVAL_MS\n");
    return 2;
}
