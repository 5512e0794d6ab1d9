/* fc_edit.c - libedit, loaded when the REPL starts.
 *
 * libedit and what it pulls in (libtinfo, libbsd, libmd) cost dynamic loading and
 * relocation at every start of fireclaw, yet only the REPL (core/main.c) reads lines with
 * it. So fireclaw is not linked against it: these definitions of the functions main.c
 * calls dlopen("libedit.so.2") on first use and forward to it, as core/fc_curl.c does for
 * libcurl. Without the library the REPL still works: plain lines from stdin, no history.
 */
#include "fc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <editline/readline.h>

#define LIBEDIT "libedit.so.2"

/* The resolved entry points. Set once, by load (fireclaw is single-threaded). */
static struct {
	int tried;
	void *handle;
	char *(*readline)(const char *);
	int (*add_history)(const char *);
	int (*read_history)(const char *);
	int (*write_history)(const char *);
} lib;

static const struct fc_dlsym SYMS[] = {
    {"readline", (void **)&lib.readline},
    {"add_history", (void **)&lib.add_history},
    {"read_history", (void **)&lib.read_history},
    {"write_history", (void **)&lib.write_history},
    {NULL, NULL},
};

/* Load it once; on failure say so once (the REPL goes on without line editing). */
static int load(void)
{
	if (lib.tried)
		return lib.handle != NULL;
	lib.tried = 1;
	const char *why = fc_dl_load(&lib.handle, LIBEDIT, "libedit2", SYMS);
	if (why)
		fprintf(stderr, "fireclaw: no line editing (%s)\n", why);
	return why == NULL;
}

/* Without libedit: the prompt, then one line from stdin (malloc'ed, no newline). */
static char *plain_readline(const char *prompt)
{
	char *line = NULL;
	size_t cap = 0;
	fputs(prompt, stdout);
	fflush(stdout);
	ssize_t n = getline(&line, &cap, stdin);
	if (n < 0) {
		free(line);
		return NULL;
	}
	if (n > 0 && line[n - 1] == '\n')
		line[n - 1] = 0;
	return line;
}

char *readline(const char *prompt)
{
	return load() ? lib.readline(prompt) : plain_readline(prompt);
}

int add_history(const char *line)
{
	return load() ? lib.add_history(line) : 0;
}

int read_history(const char *path)
{
	return load() ? lib.read_history(path) : 0;
}

int write_history(const char *path)
{
	return load() ? lib.write_history(path) : -1;
}
