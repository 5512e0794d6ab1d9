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

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>

#include <curl/curl.h>

#define LIBCURL "libcurl.so.4"

/* The resolved entry points. Set once, by load_libcurl (fireclaw is single-threaded). */
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

#define RESOLVE(field, name)                                                                       \
	do {                                                                                       \
		*(void **)&lib.field = dlsym(lib.handle, name);                                    \
		if (!lib.field)                                                                    \
			return name;                                                               \
	} while (0)

/* NULL on success, else what is missing. */
static const char *resolve_all(void)
{
	RESOLVE(global_init, "curl_global_init");
	RESOLVE(easy_init, "curl_easy_init");
	RESOLVE(easy_cleanup, "curl_easy_cleanup");
	RESOLVE(easy_setopt, "curl_easy_setopt");
	RESOLVE(easy_getinfo, "curl_easy_getinfo");
	RESOLVE(easy_strerror, "curl_easy_strerror");
	RESOLVE(multi_init, "curl_multi_init");
	RESOLVE(multi_cleanup, "curl_multi_cleanup");
	RESOLVE(multi_add_handle, "curl_multi_add_handle");
	RESOLVE(multi_remove_handle, "curl_multi_remove_handle");
	RESOLVE(multi_setopt, "curl_multi_setopt");
	RESOLVE(multi_socket_action, "curl_multi_socket_action");
	RESOLVE(multi_info_read, "curl_multi_info_read");
	RESOLVE(slist_append, "curl_slist_append");
	RESOLVE(slist_free_all, "curl_slist_free_all");
	return NULL;
}

const char *fc_curl_load(void)
{
	static char err[300];
	if (lib.handle)
		return NULL;
	void *h = dlopen(LIBCURL, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		snprintf(err, sizeof err, "cannot load %s (%s): install libcurl4", LIBCURL, dlerror());
		return err;
	}
	lib.handle = h;
	const char *missing = resolve_all();
	if (missing) {
		snprintf(err, sizeof err, "%s has no %s", LIBCURL, missing);
		dlclose(h);
		lib.handle = NULL;
		return err;
	}
	return NULL;
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
