/* vm.c - fireclaw.core.vm: the wire protocols between fireclaw and a VMM process.
 *
 *   api = vm.api_client(socket_path [, {timeout = 10, name = "firecracker"}])
 *   api:get(path)  api:put(path, t)  api:patch(path, t)
 *       -> the decoded JSON body, or true (204 / empty body); an HTTP error raises
 *          "firecracker: PUT /boot-source: 400 <fault_message>"
 *   api:close()
 *
 *   vm.wait_socket(path, timeout_s [, proc [, {log = path | {paths}, name =, what =}]])
 *       -> true once a connect() to the unix socket succeeds; raises on timeout or when
 *          `proc` (a fireclaw.proc) exits first, quoting the tail of its log files
 *   vm.log_tail(path | {paths} [, lines = 10]) -> the last lines of the files ("" if none)
 *
 *   q = vm.qmp_connect(path [, timeout_s = 5])   -- greeting read, qmp_capabilities sent
 *   q:execute(cmd [, args [, timeout_s [, fd]]]) -> the "return" value; an error raises
 *          "qmp: migrate: GenericError: <desc>". fd (an integer) goes along with the
 *          command (SCM_RIGHTS), as getfd and add-fd want; QEMU gets its own copy.
 *   q:events() -> queued asynchronous events (the queue is emptied)
 *   q:wait_event(name [, timeout_s]) -> the event, or nil on timeout
 *   q:greeting() -> the QMP greeting ({QMP = {version = …}})
 *   q:close()
 *
 * The Firecracker client drives libcurl's multi interface from fc_poll, so a request is
 * interruptible by Ctrl-C like every other wait, and keeps one easy handle per VM so the
 * connection to the API socket is reused across requests.
 */
#include "fc.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <curl/curl.h>

#define API_MT "fireclaw.vm.api"
#define QMP_MT "fireclaw.vm.qmp"
#define MAX_SOCKS 4
#define MAX_LOG_FILES 8
/* Bounds on what a VMM may make fireclaw hold: an API response body, a QMP line. Real
 * ones are a few KiB; a VMM that sends more is broken (or not the VMM). */
#define MAX_MESSAGE (16u << 20)

/* ---- JSON through fireclaw.json (one implementation of the null/array rules) ---- */

static void push_json_fn(lua_State *L, const char *fn)
{
	lua_getglobal(L, "require");
	lua_pushliteral(L, "fireclaw.json");
	lua_call(L, 1, 1);
	lua_getfield(L, -1, fn);
	lua_remove(L, -2);
}

/* Decode s; pushes the value and returns 1, or pushes the error message and returns 0. */
static int json_decode(lua_State *L, const char *s, size_t len)
{
	push_json_fn(L, "decode");
	lua_pushlstring(L, s, len);
	return lua_pcall(L, 1, 1, 0) == 0;
}

/* Encode the value at idx; pushes the string. Raises on values JSON cannot hold. */
static const char *json_encode(lua_State *L, int idx, size_t *len)
{
	idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
	push_json_fn(L, "encode");
	lua_pushvalue(L, idx);
	lua_call(L, 1, 1);
	return lua_tolstring(L, -1, len);
}

/* ==== Firecracker API client ==== */

struct api {
	CURLM *multi;
	CURL *easy;
	struct curl_slist *headers;
	char *socket_path;
	char name[32];	    /* error prefix: "firecracker" */
	long timeout_ms;    /* per request */
	int attached;	    /* easy is in multi (a request is in flight or was interrupted) */
	struct fc_buf resp; /* body of the current response */
	int resp_oom;	    /* the write callback ran out of memory */
	int resp_big;	    /* the body was larger than MAX_MESSAGE */
	char errbuf[CURL_ERROR_SIZE];
	/* the sockets libcurl asked us to watch, and its timer */
	struct {
		curl_socket_t fd;
		int what;
	} socks[MAX_SOCKS];
	int nsocks;
	double timer_deadline; /* monotonic ms, -1 = none */
};

static size_t on_body(char *p, size_t size, size_t n, void *userp)
{
	struct api *a = userp;
	if (a->resp.len + size * n > MAX_MESSAGE) {
		a->resp_big = 1;
		return 0; /* CURLE_WRITE_ERROR, as below */
	}
	if (fc_buf_append(&a->resp, p, size * n) < 0) {
		a->resp_oom = 1;
		return 0; /* makes libcurl fail the transfer with CURLE_WRITE_ERROR */
	}
	return size * n;
}

/* libcurl tells us which socket to watch for what (CURLMOPT_SOCKETFUNCTION). */
static int on_socket(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
	(void)e;
	(void)socketp;
	struct api *a = userp;
	int i = 0;
	while (i < a->nsocks && a->socks[i].fd != s)
		i++;
	if (what == CURL_POLL_REMOVE) {
		if (i < a->nsocks)
			a->socks[i] = a->socks[--a->nsocks];
		return 0;
	}
	if (i == a->nsocks) {
		if (a->nsocks == MAX_SOCKS)
			return -1;
		a->nsocks++;
		a->socks[i].fd = s;
	}
	a->socks[i].what = what;
	return 0;
}

/* libcurl's single timer (CURLMOPT_TIMERFUNCTION): -1 deletes it. */
static int on_timer(CURLM *m, long timeout_ms, void *userp)
{
	(void)m;
	struct api *a = userp;
	a->timer_deadline = timeout_ms < 0 ? -1 : fc_now_ms() + (double)timeout_ms;
	return 0;
}

static struct api *check_api(lua_State *L)
{
	struct api *a = fc_check(L, 1, API_MT);
	if (!a->easy)
		fc_error(L, "%s: API client is closed", a->name[0] ? a->name : "firecracker");
	return a;
}

/* Take the easy handle out of the multi handle. The socket table is left alone: libcurl
 * keeps reporting changes for sockets it still watches (an idle cached connection). */
static void api_detach(struct api *a)
{
	if (a->attached)
		curl_multi_remove_handle(a->multi, a->easy);
	a->attached = 0;
}

static int api_close(lua_State *L)
{
	struct api *a = fc_check(L, 1, API_MT);
	/* libcurl's order: easy handles out of the multi, the multi, then the easy handles */
	if (a->easy)
		api_detach(a);
	if (a->multi)
		curl_multi_cleanup(a->multi);
	if (a->easy)
		curl_easy_cleanup(a->easy);
	curl_slist_free_all(a->headers);
	free(a->socket_path);
	fc_buf_free(&a->resp);
	a->easy = NULL;
	a->multi = NULL;
	a->headers = NULL;
	a->socket_path = NULL;
	return 0;
}

/* Let libcurl act on what poll() saw. */
static void api_dispatch(struct api *a, struct pollfd *p, int n, int *running)
{
	for (int i = 0; i < n; i++) {
		if (!p[i].revents)
			continue;
		int ev = 0;
		if (p[i].revents & (POLLIN | POLLHUP))
			ev |= CURL_CSELECT_IN;
		if (p[i].revents & POLLOUT)
			ev |= CURL_CSELECT_OUT;
		if (p[i].revents & POLLERR)
			ev |= CURL_CSELECT_ERR;
		curl_multi_socket_action(a->multi, p[i].fd, ev, running);
	}
}

/* Run the prepared transfer to completion, waiting in fc_poll (interruptible). An
 * interrupted request leaves the handle attached; the next request detaches it first. */
static CURLcode api_perform(lua_State *L, struct api *a)
{
	api_detach(a);
	a->errbuf[0] = '\0';
	a->resp.len = 0;
	a->resp_oom = 0;
	a->resp_big = 0;
	if (curl_multi_add_handle(a->multi, a->easy) != CURLM_OK)
		return CURLE_FAILED_INIT;
	a->attached = 1;
	/* a backstop in case libcurl's own timeout (CURLOPT_TIMEOUT_MS) never fires */
	double hard_deadline = fc_now_ms() + (double)a->timeout_ms + 1000;
	int running = 1;
	curl_multi_socket_action(a->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	while (running) {
		struct pollfd p[MAX_SOCKS];
		int n = a->nsocks;
		for (int i = 0; i < n; i++) {
			int w = a->socks[i].what;
			p[i] =
			    (struct pollfd){.fd = a->socks[i].fd,
					    .events = (short)(((w & CURL_POLL_IN) ? POLLIN : 0) |
							      ((w & CURL_POLL_OUT) ? POLLOUT : 0))};
		}
		int wait = fc_ms_left(a->timer_deadline);
		int hard = fc_ms_left(hard_deadline);
		if (hard == 0) {
			snprintf(a->errbuf, sizeof a->errbuf, "no answer within %ld ms",
				 a->timeout_ms);
			api_detach(a);
			return CURLE_OPERATION_TIMEDOUT;
		}
		if (wait < 0 || wait > hard)
			wait = hard;
		if (fc_poll(L, p, (nfds_t)n, wait) == 0) {
			a->timer_deadline = -1;
			curl_multi_socket_action(a->multi, CURL_SOCKET_TIMEOUT, 0, &running);
		} else {
			api_dispatch(a, p, n, &running);
		}
	}
	CURLcode rc = CURLE_OK;
	int left;
	CURLMsg *m;
	while ((m = curl_multi_info_read(a->multi, &left)) != NULL)
		if (m->msg == CURLMSG_DONE)
			rc = m->data.result;
	api_detach(a);
	return rc;
}

/* What a finished exchange means, from its status and body alone (no I/O: fuzz/fc_api.c
 * calls it with arbitrary bytes). 2xx: pushes the decoded body, or true for 204 or an
 * empty body, and returns 1. Else pushes the message to raise and returns 0:
 * "<name>: PUT /x: 400 <fault_message>" (the raw body when it is not Firecracker's
 * {"fault_message": …}), or "…: bad JSON in the response (…)" for a 2xx. */
int fc_api_result(lua_State *L, const char *name, const char *method, const char *path, long status,
		  const char *body, size_t len)
{
	int top = lua_gettop(L);
	if (status >= 200 && status <= 299) {
		if (status == 204 || len == 0) {
			lua_pushboolean(L, 1);
			return 1;
		}
		if (json_decode(L, body, len))
			return 1;
		lua_pushfstring(L, "%s: %s %s: bad JSON in the response (%s)", name, method, path,
				lua_tostring(L, -1));
		lua_replace(L, top + 1);
		return 0;
	}
	lua_pushlstring(L, body, len); /* the raw body, NUL bytes and all */
	const char *msg = len ? lua_tostring(L, -1) : "(empty body)";
	if (len && json_decode(L, body, len) && lua_istable(L, -1)) {
		lua_getfield(L, -1, "fault_message");
		if (lua_isstring(L, -1))
			msg = lua_tostring(L, -1);
	}
	lua_pushfstring(L, "%s: %s %s: %d %s", name, method, path, (int)status, msg);
	lua_replace(L, top + 1);
	lua_settop(L, top + 1);
	return 0;
}

static void raise_transport_error(lua_State *L, struct api *a, const char *method, const char *path,
				  CURLcode rc)
{
	const char *why = a->errbuf[0] ? a->errbuf : curl_easy_strerror(rc);
	if (a->resp_oom)
		why = "out of memory reading the response";
	if (a->resp_big)
		why = "the response body is larger than 16 MiB";
	if (rc == CURLE_COULDNT_CONNECT)
		fc_error(L, "%s: %s %s: cannot connect to the API socket %s (is the VMM running?)",
			 a->name, method, path, a->socket_path);
	fc_error(L, "%s: %s %s: %s", a->name, method, path, why);
}

/* Point the easy handle at method + path (+ body for PUT/PATCH). */
static void api_prepare(lua_State *L, struct api *a, const char *method, const char *path,
			const char *body, size_t blen)
{
	lua_pushfstring(L, "http://localhost%s", path);
	curl_easy_setopt(a->easy, CURLOPT_URL, lua_tostring(L, -1)); /* libcurl copies it */
	lua_pop(L, 1);
	if (!body) {
		curl_easy_setopt(a->easy, CURLOPT_HTTPGET, 1L);
		curl_easy_setopt(a->easy, CURLOPT_CUSTOMREQUEST, NULL);
		return;
	}
	curl_easy_setopt(a->easy, CURLOPT_POSTFIELDSIZE, (long)blen);
	curl_easy_setopt(a->easy, CURLOPT_COPYPOSTFIELDS, body);
	curl_easy_setopt(a->easy, CURLOPT_CUSTOMREQUEST, method);
}

static int api_request(lua_State *L, const char *method, int has_body)
{
	struct api *a = check_api(L);
	const char *path = luaL_checkstring(L, 2);
	if (path[0] != '/')
		fc_error(L, "%s: %s %s: the path must start with '/'", a->name, method, path);
	const char *body = NULL;
	size_t blen = 0;
	if (has_body) {
		luaL_checktype(L, 3, LUA_TTABLE);
		body = json_encode(L, 3, &blen);
	}
	api_prepare(L, a, method, path, body, blen);
	CURLcode rc = api_perform(L, a);
	if (rc != CURLE_OK)
		raise_transport_error(L, a, method, path, rc);
	long status = 0;
	curl_easy_getinfo(a->easy, CURLINFO_RESPONSE_CODE, &status);
	if (!fc_api_result(L, a->name, method, path, status, a->resp.data ? a->resp.data : "",
			   a->resp.len))
		lua_error(L);
	return 1;
}

static int api_get(lua_State *L)
{
	return api_request(L, "GET", 0);
}

static int api_put(lua_State *L)
{
	return api_request(L, "PUT", 1);
}

static int api_patch(lua_State *L)
{
	return api_request(L, "PATCH", 1);
}

static int api_tostring(lua_State *L)
{
	struct api *a = fc_check(L, 1, API_MT);
	lua_pushfstring(L, "%s API client (%s)", a->name,
			a->socket_path ? a->socket_path : "closed");
	return 1;
}

/* Configure the easy handle once: every request reuses it (and its connection). */
static int api_setup(struct api *a)
{
	CURL *e = a->easy;
	a->headers = curl_slist_append(NULL, "Content-Type: application/json");
	struct curl_slist *h =
	    a->headers ? curl_slist_append(a->headers, "Accept: application/json") : NULL;
	/* Firecracker's HTTP server wants the body at once, not an Expect/100-continue dance */
	h = h ? curl_slist_append(h, "Expect:") : NULL;
	if (!h)
		return -1;
	a->headers = h;
	int bad = 0;
	bad |= curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, a->socket_path) != CURLE_OK;
	bad |= curl_easy_setopt(e, CURLOPT_HTTPHEADER, a->headers) != CURLE_OK;
	bad |= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body) != CURLE_OK;
	bad |= curl_easy_setopt(e, CURLOPT_WRITEDATA, a) != CURLE_OK;
	bad |= curl_easy_setopt(e, CURLOPT_ERRORBUFFER, a->errbuf) != CURLE_OK;
	bad |= curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, a->timeout_ms) != CURLE_OK;
	bad |= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) != CURLE_OK;
	/* the socket is local: an http_proxy in the environment must not be used */
	bad |= curl_easy_setopt(e, CURLOPT_PROXY, "") != CURLE_OK;
	bad |= curl_multi_setopt(a->multi, CURLMOPT_SOCKETFUNCTION, on_socket) != CURLM_OK;
	bad |= curl_multi_setopt(a->multi, CURLMOPT_SOCKETDATA, a) != CURLM_OK;
	bad |= curl_multi_setopt(a->multi, CURLMOPT_TIMERFUNCTION, on_timer) != CURLM_OK;
	bad |= curl_multi_setopt(a->multi, CURLMOPT_TIMERDATA, a) != CURLM_OK;
	return bad ? -1 : 0;
}

static int l_api_client(lua_State *L)
{
	static const char *const known[] = {"timeout", "name", NULL};
	const char *path = luaL_checkstring(L, 1);
	fc_opt_check(L, 2, "vm.api_client", known);
	double timeout = fc_opt_number(L, 2, "timeout", 10);
	const char *name = fc_opt_string(L, 2, "name", "firecracker");
	if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		fc_error(L, "%s: API socket path too long for a unix socket: %s", name, path);
	if (timeout <= 0)
		fc_error(L, "%s: API client timeout must be positive", name);
	struct api *a = fc_new(L, sizeof *a, API_MT); /* owns everything below from here on */
	snprintf(a->name, sizeof a->name, "%s", name);
	a->timeout_ms = (long)(timeout * 1000);
	a->timer_deadline = -1;
	a->socket_path = strdup(path);
	/* libcurl is loaded on first use (core/fc_curl.c); its init is reference-counted */
	const char *why = fc_curl_load();
	if (why || curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
		fc_error(L, "%s: %s", name, why ? why : "libcurl failed to initialise");
	}
	a->multi = curl_multi_init();
	a->easy = curl_easy_init();
	if (!a->socket_path || !a->multi || !a->easy || api_setup(a) < 0) {
		fc_error(L, "%s: cannot set up an HTTP client for %s", name, path);
	}
	return 1;
}

/* ==== waiting for a socket ==== */

/* The last `lines` lines of one file, appended to b (nothing if it is missing or empty). */
static void tail_file(struct fc_buf *b, const char *path, int lines)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	char chunk[8192];
	off_t size = lseek(fd, 0, SEEK_END);
	off_t from = size > (off_t)sizeof chunk - 1 ? size - (off_t)sizeof chunk + 1 : 0;
	ssize_t n = size > 0 ? pread(fd, chunk, (size_t)(size - from), from) : 0;
	close(fd);
	if (n <= 0)
		return;
	while (n > 0 && (chunk[n - 1] == '\n' || chunk[n - 1] == '\r' || chunk[n - 1] == ' '))
		n--;
	if (n == 0)
		return;
	ssize_t start = n;
	for (int seen = 0; start > 0; start--) {
		if (chunk[start - 1] == '\n' && ++seen == lines)
			break;
	}
	if (b->len)
		fc_buf_append(b, "\n", 1);
	fc_buf_append(b, chunk + start, (size_t)(n - start));
}

/* Push the tails of the file (a string) or files (an array) at idx, joined. */
static void push_tail(lua_State *L, int idx, int lines)
{
	struct fc_buf b = {0};
	if (lua_isstring(L, idx)) {
		tail_file(&b, lua_tostring(L, idx), lines);
	} else if (lua_istable(L, idx)) {
		int n = (int)lua_objlen(L, idx);
		for (int i = 1; i <= n && i <= MAX_LOG_FILES; i++) {
			lua_rawgeti(L, idx, i);
			if (lua_isstring(L, -1))
				tail_file(&b, lua_tostring(L, -1), lines);
			lua_pop(L, 1);
		}
	}
	lua_pushlstring(L, b.data ? b.data : "", b.len);
	fc_buf_free(&b);
}

static int l_log_tail(lua_State *L)
{
	int lines = (int)luaL_optinteger(L, 2, 10);
	push_tail(L, 1, lines < 1 ? 1 : lines);
	return 1;
}

/* Call method `name` of the object at idx with no arguments; one result pushed. */
static void call_method(lua_State *L, int idx, const char *name, int nargs_extra, double arg)
{
	lua_getfield(L, idx, name);
	lua_pushvalue(L, idx);
	if (nargs_extra)
		lua_pushnumber(L, arg);
	lua_call(L, 1 + nargs_extra, 1);
}

/* The process at idx is gone: raise "<name> exited (status 1) before its <what> appeared". */
static void raise_exited(lua_State *L, int proc, int opts, const char *name, const char *what)
{
	call_method(L, proc, "wait", 1, 0);
	char how[64] = "exited";
	if (lua_istable(L, -1)) {
		lua_getfield(L, -1, "status");
		lua_getfield(L, -2, "signal");
		if (lua_isnumber(L, -2))
			snprintf(how, sizeof how, "exited (status %d)", (int)lua_tointeger(L, -2));
		else if (lua_isnumber(L, -1))
			snprintf(how, sizeof how, "was killed (signal %d)",
				 (int)lua_tointeger(L, -1));
	}
	lua_getfield(L, opts, "log");
	push_tail(L, lua_gettop(L), 10);
	const char *tail = lua_tostring(L, -1);
	fc_error(L, "%s %s before its %s appeared: %s", name, how, what,
		 *tail ? tail : "(its log is empty)");
}

/* One connect() attempt: 0 on success, else -1 with errno. */
static int try_connect(const struct sockaddr_un *sa)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int rc = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
	int e = errno;
	close(fd);
	errno = e;
	return rc;
}

static void fill_sockaddr(lua_State *L, struct sockaddr_un *sa, const char *path)
{
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sa->sun_path)
		fc_error(L, "socket path too long for a unix socket: %s", path);
	strcpy(sa->sun_path, path);
}

/* Poll a unix socket until it accepts connections. Steps start at 1 ms and grow to
 * 10 ms: a VMM's socket appears within a few ms, and 100 ms steps would dominate a
 * restore. The wait also wakes as soon as the process exits (its pidfd is polled). */
static int l_wait_socket(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	double timeout = luaL_checknumber(L, 2);
	int proc = lua_isnoneornil(L, 3) ? 0 : 3;
	lua_settop(L, 4);
	if (lua_isnil(L, 4)) {
		lua_newtable(L);
		lua_replace(L, 4);
	}
	static const char *const known[] = {"name", "what", "log", NULL};
	fc_opt_check(L, 4, "vm.wait_socket", known);
	const char *name = fc_opt_string(L, 4, "name", "the VMM");
	const char *what = fc_opt_string(L, 4, "what", "socket");
	struct sockaddr_un sa;
	fill_sockaddr(L, &sa, path);
	int pidfd = -1;
	if (proc) {
		call_method(L, proc, "pidfd", 0, 0);
		pidfd = (int)lua_tointeger(L, -1);
		lua_pop(L, 1);
	}
	double deadline = fc_now_ms() + timeout * 1000, step = 1;
	for (;;) {
		if (try_connect(&sa) == 0) {
			lua_pushboolean(L, 1);
			return 1;
		}
		if (errno != ENOENT && errno != ECONNREFUSED && errno != EAGAIN)
			fc_errno_error(L, errno, "%s: connect to %s %s", name, what, path);
		if (proc) {
			call_method(L, proc, "alive", 0, 0);
			if (!lua_toboolean(L, -1))
				raise_exited(L, proc, 4, name, what);
			lua_pop(L, 1);
		}
		int left = fc_ms_left(deadline);
		if (left == 0) {
			lua_getfield(L, 4, "log");
			push_tail(L, lua_gettop(L), 10);
			const char *tail = lua_tostring(L, -1);
			fc_error(L, "%s: %s %s did not appear within %gs%s%s", name, what, path,
				 timeout, *tail ? "; its log ends with:\n" : "", tail);
		}
		struct pollfd p = {.fd = pidfd, .events = POLLIN};
		fc_poll(L, &p, pidfd >= 0 ? 1 : 0, left < step ? left : (int)step);
		step = step * 1.5 > 10 ? 10 : step * 1.5;
	}
}

/* ==== QMP client ==== */

struct qmp {
	int fd;
	long next_id;
	struct fc_buf in; /* bytes read but not yet split into messages */
};

static int qmp_close(lua_State *L)
{
	struct qmp *q = fc_check(L, 1, QMP_MT);
	if (q->fd >= 0)
		close(q->fd);
	q->fd = -1;
	fc_buf_free(&q->in);
	return 0;
}

static struct qmp *check_qmp(lua_State *L)
{
	struct qmp *q = fc_check(L, 1, QMP_MT);
	if (q->fd < 0)
		fc_error(L, "qmp: connection is closed");
	return q;
}

/* Read what the socket has into q->in, waiting at most wait_ms. Returns 0 on timeout,
 * 1 when bytes arrived; raises when QEMU closed the connection. */
static int qmp_fill(lua_State *L, struct qmp *q, int wait_ms)
{
	struct pollfd p = {.fd = q->fd, .events = POLLIN};
	if (fc_poll(L, &p, 1, wait_ms) == 0)
		return 0;
	char chunk[16384];
	ssize_t n = recv(q->fd, chunk, sizeof chunk, 0);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 1;
	if (n < 0)
		fc_errno_error(L, errno, "qmp: read");
	if (n == 0)
		fc_error(L, "qmp: QEMU closed the connection");
	if (fc_buf_append(&q->in, chunk, (size_t)n) < 0)
		fc_error(L, "qmp: out of memory");
	return 1;
}

/* Push the next complete message (decoded) and return 1, or return 0 if none arrived
 * before the deadline (monotonic ms; 0 = only what is already readable). */
static int qmp_next(lua_State *L, struct qmp *q, double deadline)
{
	for (;;) {
		char *nl = q->in.len ? memchr(q->in.data, '\n', q->in.len) : NULL;
		if (nl) {
			size_t len = (size_t)(nl - q->in.data);
			int ok = json_decode(L, q->in.data, len);
			memmove(q->in.data, nl + 1, q->in.len - len - 1);
			q->in.len -= len + 1;
			if (!ok)
				fc_error(L, "qmp: bad JSON from QEMU (%s)", lua_tostring(L, -1));
			return 1;
		}
		if (q->in.len > MAX_MESSAGE)
			fc_error(L, "qmp: a message from QEMU is longer than %d bytes",
				 (int)MAX_MESSAGE);
		int left = deadline == 0 ? 0 : fc_ms_left(deadline);
		if (!qmp_fill(L, q, left) && left == 0)
			return 0;
	}
}

/* Append the message on top of the stack to the event queue (the userdata's env). */
static void queue_event(lua_State *L, int self)
{
	lua_getfenv(L, self);
	lua_getfield(L, -1, "events");
	lua_pushvalue(L, -3);
	lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
	lua_pop(L, 3);
}

static int is_event(lua_State *L, int idx)
{
	lua_getfield(L, idx, "event");
	int r = !lua_isnil(L, -1);
	lua_pop(L, 1);
	return r;
}

/* Send one message; when fd >= 0 it travels with the first bytes that go out. */
static void qmp_send(lua_State *L, struct qmp *q, const char *s, size_t len, int fd,
		     double deadline)
{
	size_t off = 0;
	while (off < len) {
		ssize_t n;
		if (fd >= 0) {
			union {
				char buf[CMSG_SPACE(sizeof(int))];
				struct cmsghdr align;
			} u;
			memset(&u, 0, sizeof u);
			struct iovec iov = {.iov_base = (char *)s + off, .iov_len = len - off};
			struct msghdr m = {.msg_iov = &iov,
					   .msg_iovlen = 1,
					   .msg_control = u.buf,
					   .msg_controllen = sizeof u.buf};
			struct cmsghdr *c = CMSG_FIRSTHDR(&m);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &fd, sizeof fd);
			n = sendmsg(q->fd, &m, MSG_NOSIGNAL);
			if (n > 0)
				fd = -1;
		} else {
			n = send(q->fd, s + off, len - off, MSG_NOSIGNAL);
		}
		if (n > 0) {
			off += (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			fc_errno_error(L, errno, "qmp: write");
		struct pollfd p = {.fd = q->fd, .events = POLLOUT};
		if (fc_poll(L, &p, 1, fc_ms_left(deadline)) == 0)
			fc_error(L, "qmp: QEMU does not read its socket");
	}
}

/* Raise "qmp: <cmd>: <class>: <desc>" for the error response on top of the stack. */
static void raise_qmp_error(lua_State *L, const char *cmd)
{
	lua_getfield(L, -1, "error");
	if (!lua_istable(L, -1)) /* {"error": true}: not QMP's shape, say what little we can */
		lua_newtable(L);
	lua_getfield(L, -1, "class");
	lua_getfield(L, -2, "desc");
	fc_error(L, "qmp: %s: %s: %s", cmd, lua_isstring(L, -2) ? lua_tostring(L, -2) : "Error",
		 lua_isstring(L, -1) ? lua_tostring(L, -1) : "(no description)");
}

/* Send {"execute": cmd, "arguments": args, "id": n} and wait for the answer with that id;
 * events read meanwhile are queued. Pushes the "return" value. */
static void qmp_execute(lua_State *L, int self, struct qmp *q, const char *cmd, int args,
			double timeout_s, int fd)
{
	long id = ++q->next_id;
	lua_createtable(L, 0, 3);
	lua_pushstring(L, cmd);
	lua_setfield(L, -2, "execute");
	if (args) {
		lua_pushvalue(L, args);
		lua_setfield(L, -2, "arguments");
	}
	lua_pushinteger(L, id);
	lua_setfield(L, -2, "id");
	size_t len;
	json_encode(L, -1, &len);
	lua_pushliteral(L, "\n");
	lua_concat(L, 2);
	const char *msg = lua_tolstring(L, -1, &len);
	double deadline = fc_now_ms() + timeout_s * 1000;
	qmp_send(L, q, msg, len, fd, deadline);
	lua_pop(L, 2);
	for (;;) {
		if (!qmp_next(L, q, deadline))
			fc_error(L, "qmp: %s: no answer within %gs", cmd, timeout_s);
		if (!lua_istable(L, -1)) {
			lua_pop(L, 1);
			continue;
		}
		if (is_event(L, -1)) {
			queue_event(L, self);
			continue;
		}
		lua_getfield(L, -1, "id");
		int mine = lua_tointeger(L, -1) == id;
		lua_pop(L, 1);
		if (!mine) { /* the late answer to an interrupted command */
			lua_pop(L, 1);
			continue;
		}
		lua_getfield(L, -1, "error");
		int failed = !lua_isnil(L, -1);
		lua_pop(L, 1);
		if (failed)
			raise_qmp_error(L, cmd);
		lua_getfield(L, -1, "return");
		lua_remove(L, -2);
		return;
	}
}

static int qmp_l_execute(lua_State *L)
{
	struct qmp *q = check_qmp(L);
	const char *cmd = luaL_checkstring(L, 2);
	int args = 0;
	if (!lua_isnoneornil(L, 3)) {
		luaL_checktype(L, 3, LUA_TTABLE);
		args = 3;
	}
	double timeout = luaL_optnumber(L, 4, 30);
	int fd = luaL_optint(L, 5, -1);
	qmp_execute(L, 1, q, cmd, args, timeout, fd);
	return 1;
}

/* Queue every message that is already readable (events QEMU sent on its own). */
static void qmp_drain(lua_State *L, struct qmp *q)
{
	while (qmp_next(L, q, 0)) {
		if (lua_istable(L, -1) && is_event(L, -1))
			queue_event(L, 1);
		else
			lua_pop(L, 1);
	}
}

static int qmp_events(lua_State *L)
{
	struct qmp *q = check_qmp(L);
	qmp_drain(L, q);
	lua_getfenv(L, 1);
	lua_getfield(L, -1, "events");
	lua_newtable(L);
	lua_setfield(L, -3, "events");
	return 1;
}

/* Remove and push the first queued event called `name`; 0 if there is none. */
static int take_event(lua_State *L, const char *name)
{
	lua_getfenv(L, 1);
	lua_getfield(L, -1, "events");
	int list = lua_gettop(L), n = (int)lua_objlen(L, list);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, list, i);
		lua_getfield(L, -1, "event");
		int match = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), name) == 0;
		lua_pop(L, 1);
		if (!match) {
			lua_pop(L, 1);
			continue;
		}
		for (int j = i; j < n; j++) { /* close the gap */
			lua_rawgeti(L, list, j + 1);
			lua_rawseti(L, list, j);
		}
		lua_pushnil(L);
		lua_rawseti(L, list, n);
		lua_replace(L, list - 1);
		lua_settop(L, list - 1);
		return 1;
	}
	lua_pop(L, 2);
	return 0;
}

static int qmp_wait_event(lua_State *L)
{
	struct qmp *q = check_qmp(L);
	const char *name = luaL_checkstring(L, 2);
	double deadline = fc_now_ms() + luaL_optnumber(L, 3, 30) * 1000;
	for (;;) {
		if (take_event(L, name))
			return 1;
		if (!qmp_next(L, q, deadline))
			return 0;
		if (lua_istable(L, -1) && is_event(L, -1))
			queue_event(L, 1);
		else
			lua_pop(L, 1);
	}
}

static int qmp_greeting(lua_State *L)
{
	fc_check(L, 1, QMP_MT);
	lua_getfenv(L, 1);
	lua_getfield(L, -1, "greeting");
	return 1;
}

static int qmp_tostring(lua_State *L)
{
	struct qmp *q = fc_check(L, 1, QMP_MT);
	lua_pushfstring(L, "qmp connection (%s)", q->fd >= 0 ? "open" : "closed");
	return 1;
}

/* Connect to QEMU's QMP socket, read the greeting and leave capabilities negotiation. */
static int l_qmp_connect(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	double timeout = luaL_optnumber(L, 2, 5);
	struct sockaddr_un sa;
	fill_sockaddr(L, &sa, path);
	struct qmp *q = fc_new(L, sizeof *q, QMP_MT);
	int self = lua_gettop(L);
	q->fd = -1;
	lua_createtable(L, 0, 2);
	lua_newtable(L);
	lua_setfield(L, -2, "events");
	lua_setfenv(L, self);
	q->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (q->fd < 0)
		fc_errno_error(L, errno, "qmp: socket");
	if (connect(q->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		fc_errno_error(L, errno, "qmp: connect to %s", path);
	double deadline = fc_now_ms() + timeout * 1000;
	if (!qmp_next(L, q, deadline))
		fc_error(L, "qmp: no greeting from %s within %gs", path, timeout);
	if (!lua_istable(L, -1))
		fc_error(L, "qmp: %s does not speak QMP (no greeting)", path);
	lua_getfield(L, -1, "QMP");
	if (lua_isnil(L, -1))
		fc_error(L, "qmp: %s does not speak QMP (no greeting)", path);
	lua_pop(L, 1);
	lua_getfenv(L, self);
	lua_insert(L, -2);
	lua_setfield(L, -2, "greeting");
	lua_pop(L, 1);
	qmp_execute(L, self, q, "qmp_capabilities", 0, timeout, -1);
	lua_settop(L, self);
	return 1;
}

int luaopen_fireclaw_vm(lua_State *L)
{
	static const luaL_Reg api_methods[] = {
	    {"get", api_get},
	    {"put", api_put},
	    {"patch", api_patch},
	    {"close", api_close},
	    {"__tostring", api_tostring},
	    {NULL, NULL},
	};
	static const luaL_Reg qmp_methods[] = {
	    {"execute", qmp_l_execute},
	    {"events", qmp_events},
	    {"wait_event", qmp_wait_event},
	    {"greeting", qmp_greeting},
	    {"close", qmp_close},
	    {"__tostring", qmp_tostring},
	    {NULL, NULL},
	};
	static const luaL_Reg fns[] = {
	    {"api_client", l_api_client},
	    {"wait_socket", l_wait_socket},
	    {"log_tail", l_log_tail},
	    {"qmp_connect", l_qmp_connect},
	    {NULL, NULL},
	};
	fc_class(L, API_MT, api_methods);
	fc_class(L, QMP_MT, qmp_methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
