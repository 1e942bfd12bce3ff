/* LD_PRELOAD shim for bench/wan: every TCP socket the process creates gets the
 * congestion control named in BENCH_TCP_CC (e.g. cubic, the default of most Linux
 * servers, when this machine's default is another). Setting one that is not in
 * net.ipv4.tcp_allowed_congestion_control needs CAP_NET_ADMIN (root in the benchmark's
 * namespaces). Accepted sockets inherit the listening socket's. Built by run.sh. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real)
        real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = real(domain, type, protocol);
    const char *cc = getenv("BENCH_TCP_CC");
    if (fd >= 0 && cc && *cc && (domain == AF_INET || domain == AF_INET6) &&
        (type & 0xff) == SOCK_STREAM &&
        setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cc, strlen(cc)) != 0) {
        perror("tcp_cc: setsockopt(TCP_CONGESTION)");
        abort();
    }
    return fd;
}
