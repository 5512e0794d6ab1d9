/* harness.c - see harness.h. */
#define _GNU_SOURCE
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

lua_State *fz_state(void)
{
	lua_State *L = luaL_newstate();
	if (!L)
		abort();
	luaL_openlibs(L);
	fc_runtime_install(L);
	return L;
}

int fz_call(lua_State *L, int nargs, int nres, const char *const *prefixes)
{
	if (lua_pcall(L, nargs, nres, 0) == 0)
		return 1;
	const char *msg = lua_tostring(L, -1);
	for (const char *const *p = prefixes; msg && *p; p++)
		if (strncmp(msg, *p, strlen(*p)) == 0) {
			lua_pop(L, 1);
			return 0;
		}
	fprintf(stderr, "unexpected error: %s\n", msg ? msg : "(not a string)");
	abort();
}

/* ---- the peer ---- */

static struct {
	pthread_mutex_t lock;
	pthread_cond_t idle;
	int listen_fd, http, busy;
	uint8_t *data; /* the peer's own copy of the current input */
	size_t size;
	char dir[64], path[128];
} peer = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, -1, 0, 0, NULL, 0, "", ""};

static void peer_cleanup(void)
{
	if (peer.path[0])
		unlink(peer.path);
	if (peer.dir[0])
		rmdir(peer.dir);
}

/* Wait up to ms for fd to become readable; 1 if it did. */
static int readable(int fd, int ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return poll(&p, 1, ms) > 0;
}

/* Read an HTTP request head (up to the blank line), or whatever comes before EOF. */
static void read_head(int fd)
{
	char buf[4096];
	size_t have = 0;
	while (have < sizeof buf - 1 && readable(fd, 5000)) {
		ssize_t n = recv(fd, buf + have, sizeof buf - 1 - have, 0);
		if (n <= 0)
			return;
		have += (size_t)n;
		buf[have] = '\0';
		if (strstr(buf, "\r\n\r\n"))
			return;
	}
}

static void serve(int fd, const uint8_t *data, size_t size)
{
	if (peer.http)
		read_head(fd);
	/* piece sizes from a small generator seeded by the input: deterministic per input */
	uint32_t seed = 2166136261u;
	for (size_t i = 0; i < size && i < 64; i++)
		seed = (seed ^ data[i]) * 16777619u;
	size_t off = 0;
	while (off < size) {
		seed = seed * 1103515245u + 12345u;
		size_t piece = 1 + (seed >> 16) % (seed & 1 ? 7 : 3000);
		if (piece > size - off)
			piece = size - off;
		ssize_t n = send(fd, data + off, piece, MSG_NOSIGNAL);
		if (n <= 0)
			break; /* the client closed: fine */
		off += (size_t)n;
	}
	shutdown(fd, SHUT_WR);
	/* read until the client closes, so it never sees a reset for unread bytes */
	char sink[4096];
	while (readable(fd, 10000) && recv(fd, sink, sizeof sink, 0) > 0)
		;
}

static void *peer_main(void *arg)
{
	(void)arg;
	for (;;) {
		if (!readable(peer.listen_fd, -1))
			continue;
		pthread_mutex_lock(&peer.lock);
		int fd = accept4(peer.listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			pthread_mutex_unlock(&peer.lock);
			continue;
		}
		peer.busy = 1;
		size_t size = peer.size;
		uint8_t *data = malloc(size ? size : 1);
		if (!data)
			abort();
		memcpy(data, peer.data, size);
		pthread_mutex_unlock(&peer.lock);
		serve(fd, data, size);
		close(fd);
		free(data);
		pthread_mutex_lock(&peer.lock);
		peer.busy = 0;
		pthread_cond_broadcast(&peer.idle);
		pthread_mutex_unlock(&peer.lock);
	}
	return NULL;
}

const char *fz_peer_start(int http)
{
	if (peer.listen_fd >= 0)
		return peer.path;
	const char *tmp = getenv("TMPDIR");
	snprintf(peer.dir, sizeof peer.dir, "%s/fz.XXXXXX", tmp && strlen(tmp) < 40 ? tmp : "/tmp");
	if (!mkdtemp(peer.dir))
		abort();
	snprintf(peer.path, sizeof peer.path, "%s/peer.sock", peer.dir);
	atexit(peer_cleanup);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", peer.path);
	peer.http = http;
	peer.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (peer.listen_fd < 0 || bind(peer.listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    listen(peer.listen_fd, 16) < 0)
		abort();
	pthread_t t;
	if (pthread_create(&t, NULL, peer_main, NULL) != 0)
		abort();
	pthread_detach(t);
	return peer.path;
}

void fz_peer_serve(const uint8_t *data, size_t size)
{
	pthread_mutex_lock(&peer.lock);
	free(peer.data);
	peer.data = malloc(size ? size : 1);
	if (!peer.data)
		abort();
	memcpy(peer.data, data, size);
	peer.size = size;
	pthread_mutex_unlock(&peer.lock);
}

void fz_peer_done(void)
{
	pthread_mutex_lock(&peer.lock);
	/* accept() runs under the lock, so "nothing queued and not busy" is consistent */
	while (peer.busy || readable(peer.listen_fd, 0))
		pthread_cond_wait(&peer.idle, &peer.lock);
	pthread_mutex_unlock(&peer.lock);
}

void fz_session(lua_State *L, const char *name, const char *code, const char *module,
		const char *path, const char *const *prefixes)
{
	if (luaL_loadbuffer(L, code, strlen(code), name) != 0)
		abort();
	lua_getglobal(L, "require");
	lua_pushstring(L, module);
	lua_call(L, 1, 1);
	lua_pushstring(L, path);
	fz_call(L, 2, 0, prefixes);
}

void fz_peer_session(const uint8_t *data, size_t size, const char *code, const char *module,
		     const char *const *prefixes)
{
	const char *path = fz_peer_start(0);
	lua_State *L = fz_state();
	fz_peer_serve(data, size);
	fz_session(L, "=session", code, module, path, prefixes);
	lua_close(L);
	fz_peer_done();
}
