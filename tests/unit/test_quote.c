/* C unit test for ssh.quote, the quoting session:exec uses for an argv: fixed cases, then
 * random byte strings (no NUL) checked against real local shells (dash as /bin/sh, and
 * bash): `SHELL -c "printf '%s\0' QUOTED"` must print each argument back byte for byte.
 * No SSH needed: the remote side of exec is just such a shell. Prints TAP. */
#include "fc.h"
#include "tap.h"

#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int luaopen_fireclaw_ssh(lua_State *L);
extern char **environ;

/* ssh.quote(argv) for argv[0..argc); returns a malloc'd string (NULL on a Lua error, whose
 * message goes to *err). */
static char *quote(lua_State *L, const char **argv, const size_t *lens, int argc, const char **err)
{
	lua_settop(L, 0);
	lua_getglobal(L, "ssh");
	lua_getfield(L, -1, "quote");
	lua_createtable(L, argc, 0);
	for (int i = 0; i < argc; i++) {
		lua_pushlstring(L, argv[i], lens[i]);
		lua_rawseti(L, -2, i + 1);
	}
	if (lua_pcall(L, 1, 1, 0) != 0) {
		*err = lua_tostring(L, -1);
		return NULL;
	}
	return strdup(lua_tostring(L, -1));
}

static void expect_quote(lua_State *L, const char **argv, int argc, const char *want,
			 const char *name)
{
	size_t lens[16];
	for (int i = 0; i < argc; i++)
		lens[i] = strlen(argv[i]);
	const char *err = NULL;
	char *got = quote(L, argv, lens, argc, &err);
	ok(got && strcmp(got, want) == 0, name);
	if (!got || strcmp(got, want) != 0)
		printf("#   got [%s], want [%s]\n", got ? got : err, want);
	free(got);
}

/* Run `shell -c script`, return its stdout (malloc'd, length in *len). */
static char *run_shell(const char *shell, const char *script, size_t *len)
{
	int fds[2];
	if (pipe2(fds, O_CLOEXEC) != 0)
		return NULL;
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
	char *argv[] = {(char *)shell, "-c", (char *)script, NULL};
	pid_t pid;
	int rc = posix_spawn(&pid, shell, &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	close(fds[1]);
	if (rc != 0) {
		close(fds[0]);
		return NULL;
	}
	size_t cap = 4096, used = 0;
	char *out = malloc(cap);
	ssize_t r;
	while (out && (r = read(fds[0], out + used, cap - used)) > 0) {
		used += (size_t)r;
		if (used == cap) {
			char *p = realloc(out, cap *= 2);
			if (!p)
				free(out);
			out = p;
		}
	}
	close(fds[0]);
	int status;
	waitpid(pid, &status, 0);
	*len = used;
	return out;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static unsigned rnd(unsigned below)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (unsigned)(rng % below);
}

/* One random argv through quote and a shell; 1 if every byte came back. */
static int fuzz_once(lua_State *L, const char *shell)
{
	char bufs[6][48];
	const char *argv[6];
	size_t lens[6], total = 0;
	int argc = 1 + (int)rnd(6);
	char want[6 * 49];
	for (int i = 0; i < argc; i++) {
		lens[i] = rnd(48);
		for (size_t j = 0; j < lens[i]; j++)
			bufs[i][j] = (char)(1 + rnd(255)); /* any byte but NUL */
		argv[i] = bufs[i];
		memcpy(want + total, bufs[i], lens[i]);
		total += lens[i];
		want[total++] = '\0';
	}
	const char *err = NULL;
	char *q = quote(L, argv, lens, argc, &err);
	if (!q)
		return 0;
	char *script = malloc(strlen(q) + 32);
	sprintf(script, "printf '%%s\\0' %s", q);
	size_t len = 0;
	char *out = run_shell(shell, script, &len);
	int same = out && len == total && memcmp(out, want, total) == 0;
	if (!same)
		printf("#   %s: [%s] came back as %zu bytes\n", shell, q, len);
	free(out);
	free(script);
	free(q);
	return same;
}

int main(void)
{
	lua_State *L = luaL_newstate();
	luaL_openlibs(L);
	lua_pushcfunction(L, luaopen_fireclaw_ssh);
	lua_call(L, 0, 1);
	lua_setglobal(L, "ssh");

	expect_quote(L, (const char *[]){"ls", "-l", "/tmp/x_y.z"}, 3, "ls -l /tmp/x_y.z",
		     "plain words are not quoted");
	expect_quote(L, (const char *[]){"a b", ""}, 2, "'a b' ''", "space and empty string");
	expect_quote(L, (const char *[]){"it's"}, 1, "'it'\\''s'", "single quote becomes '\\''");
	expect_quote(L, (const char *[]){"$(id)", "`id`", "a;b", "\\"}, 4,
		     "'$(id)' '`id`' 'a;b' '\\'", "$ ` ; \\ are quoted");
	expect_quote(L, (const char *[]){"a\nb", "*"}, 2, "'a\nb' '*'",
		     "newline and glob are quoted");

	const char *err = NULL;
	size_t nul_len = 3;
	char *q = quote(L, (const char *[]){"a\0b"}, &nul_len, 1, &err);
	ok(!q && err && strstr(err, "NUL"), "an argument with NUL is refused");
	free(q);

	const char *shells[] = {"/bin/sh", "/bin/bash"};
	for (int s = 0; s < 2; s++) {
		if (access(shells[s], X_OK) != 0) {
			printf("ok %d # skip %s not found\n", ++n, shells[s]);
			continue;
		}
		int good = 1;
		for (int i = 0; i < 300 && good; i++)
			good = fuzz_once(L, shells[s]);
		char name[96];
		snprintf(name, sizeof name, "300 random argvs through %s come back byte-identical",
			 shells[s]);
		ok(good, name);
	}
	lua_close(L);
	return tap_done();
}
