/* fc_curl.c - libcurl, loaded when the first Firecracker API client is made.
 *
 * libcurl and the 26 libraries it pulls in cost ~6 ms of dynamic loading and relocation at
 * every start of fireclaw (measured: 11 ms with, 4.6 ms without), yet only the Firecracker
 * driver uses it. So fireclaw is not linked against libcurl: these definitions of the
 * libcurl functions core/vm.c calls dlopen("libcurl.so.4") on first use and forward to
 * it. The API and ABI are libcurl's own (same header, same soname Debian ships).
 */
#define CURL_DISABLE_TYPECHECK
#include "fc.h"

#include <stdarg.h>

#include <curl/curl.h>

#define LIBCURL "libcurl.so.4"

/* The resolved entry points. Set once, by fc_curl_load (fireclaw is single-threaded). */
static struct {
	void *handle;
	CURLcode (*global_init)(long);
	CURL *(*easy_init)(void);
	void (*easy_cleanup)(CURL *);
	CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
	CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
	const char *(*easy_strerror)(CURLcode);
	CURLM *(*multi_init)(void);
	CURLMcode (*multi_cleanup)(CURLM *);
	CURLMcode (*multi_add_handle)(CURLM *, CURL *);
	CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
	CURLMcode (*multi_setopt)(CURLM *, CURLMoption, ...);
	CURLMcode (*multi_socket_action)(CURLM *, curl_socket_t, int, int *);
	CURLMsg *(*multi_info_read)(CURLM *, int *);
	struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
	void (*slist_free_all)(struct curl_slist *);
} lib;

static const struct fc_dlsym SYMS[] = {
    {"curl_global_init", (void **)&lib.global_init},
    {"curl_easy_init", (void **)&lib.easy_init},
    {"curl_easy_cleanup", (void **)&lib.easy_cleanup},
    {"curl_easy_setopt", (void **)&lib.easy_setopt},
    {"curl_easy_getinfo", (void **)&lib.easy_getinfo},
    {"curl_easy_strerror", (void **)&lib.easy_strerror},
    {"curl_multi_init", (void **)&lib.multi_init},
    {"curl_multi_cleanup", (void **)&lib.multi_cleanup},
    {"curl_multi_add_handle", (void **)&lib.multi_add_handle},
    {"curl_multi_remove_handle", (void **)&lib.multi_remove_handle},
    {"curl_multi_setopt", (void **)&lib.multi_setopt},
    {"curl_multi_socket_action", (void **)&lib.multi_socket_action},
    {"curl_multi_info_read", (void **)&lib.multi_info_read},
    {"curl_slist_append", (void **)&lib.slist_append},
    {"curl_slist_free_all", (void **)&lib.slist_free_all},
    {NULL, NULL},
};

const char *fc_curl_load(void)
{
	return fc_dl_load(&lib.handle, LIBCURL, "libcurl4", SYMS);
}

/* Callers go through curl_global_init (core/vm.c does, before any other call), which
 * loads the library; a failure to load is reported as CURLE_FAILED_INIT. */
CURLcode curl_global_init(long flags)
{
	if (fc_curl_load())
		return CURLE_FAILED_INIT;
	return lib.global_init(flags);
}

CURL *curl_easy_init(void)
{
	return fc_curl_load() ? NULL : lib.easy_init();
}

void curl_easy_cleanup(CURL *h)
{
	if (lib.handle)
		lib.easy_cleanup(h);
}

/* libcurl reads one argument whose type follows from the option number's range. */
CURLcode curl_easy_setopt(CURL *h, CURLoption opt, ...)
{
	va_list ap;
	va_start(ap, opt);
	CURLcode rc;
	if (opt < CURLOPTTYPE_OBJECTPOINT)
		rc = lib.easy_setopt(h, opt, va_arg(ap, long));
	else if (opt < CURLOPTTYPE_FUNCTIONPOINT)
		rc = lib.easy_setopt(h, opt, va_arg(ap, void *));
	else if (opt < CURLOPTTYPE_OFF_T)
		rc = lib.easy_setopt(h, opt, va_arg(ap, void (*)(void)));
	else
		rc = lib.easy_setopt(h, opt, va_arg(ap, curl_off_t));
	va_end(ap);
	return rc;
}

/* Every CURLINFO takes a pointer. */
CURLcode curl_easy_getinfo(CURL *h, CURLINFO info, ...)
{
	va_list ap;
	va_start(ap, info);
	CURLcode rc = lib.easy_getinfo(h, info, va_arg(ap, void *));
	va_end(ap);
	return rc;
}

const char *curl_easy_strerror(CURLcode code)
{
	return lib.handle ? lib.easy_strerror(code) : "libcurl not loaded";
}

CURLM *curl_multi_init(void)
{
	return fc_curl_load() ? NULL : lib.multi_init();
}

CURLMcode curl_multi_cleanup(CURLM *m)
{
	return lib.handle ? lib.multi_cleanup(m) : CURLM_BAD_HANDLE;
}

CURLMcode curl_multi_add_handle(CURLM *m, CURL *h)
{
	return lib.multi_add_handle(m, h);
}

CURLMcode curl_multi_remove_handle(CURLM *m, CURL *h)
{
	return lib.handle ? lib.multi_remove_handle(m, h) : CURLM_BAD_HANDLE;
}

CURLMcode curl_multi_setopt(CURLM *m, CURLMoption opt, ...)
{
	va_list ap;
	va_start(ap, opt);
	CURLMcode rc;
	if (opt < CURLOPTTYPE_OBJECTPOINT)
		rc = lib.multi_setopt(m, opt, va_arg(ap, long));
	else if (opt < CURLOPTTYPE_FUNCTIONPOINT)
		rc = lib.multi_setopt(m, opt, va_arg(ap, void *));
	else if (opt < CURLOPTTYPE_OFF_T)
		rc = lib.multi_setopt(m, opt, va_arg(ap, void (*)(void)));
	else
		rc = lib.multi_setopt(m, opt, va_arg(ap, curl_off_t));
	va_end(ap);
	return rc;
}

CURLMcode curl_multi_socket_action(CURLM *m, curl_socket_t s, int ev, int *running)
{
	return lib.multi_socket_action(m, s, ev, running);
}

CURLMsg *curl_multi_info_read(CURLM *m, int *left)
{
	return lib.multi_info_read(m, left);
}

struct curl_slist *curl_slist_append(struct curl_slist *list, const char *s)
{
	return fc_curl_load() ? NULL : lib.slist_append(list, s);
}

void curl_slist_free_all(struct curl_slist *list)
{
	if (lib.handle)
		lib.slist_free_all(list);
}
