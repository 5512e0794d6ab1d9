/* fc_vm_api.c - fireclaw.vm's Firecracker API client (vm.api_client): HTTP over the API's
 * unix socket through libcurl's multi interface, driven from fc_poll. See core/vm.c. */
#include "fc_vm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <curl/curl.h>

#define API_MT "fireclaw.vm.api"
#define MAX_SOCKS 4

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
		if (vm_json_decode(L, body, len))
			return 1;
		lua_pushfstring(L, "%s: %s %s: bad JSON in the response (%s)", name, method, path,
				lua_tostring(L, -1));
		lua_replace(L, top + 1);
		return 0;
	}
	lua_pushlstring(L, body, len); /* the raw body, NUL bytes and all */
	const char *msg = len ? lua_tostring(L, -1) : "(empty body)";
	if (len && vm_json_decode(L, body, len) && lua_istable(L, -1)) {
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
		body = vm_json_encode(L, 3, &blen);
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

int vm_l_api_client(lua_State *L)
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

void vm_api_class(lua_State *L)
{
	static const luaL_Reg api_methods[] = {
	    {"get", api_get},
	    {"put", api_put},
	    {"patch", api_patch},
	    {"close", api_close},
	    {"__tostring", api_tostring},
	    {NULL, NULL},
	};
	fc_class(L, API_MT, api_methods);
}
