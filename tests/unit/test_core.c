/* C unit tests for the pure parts of the core: the JSON bridge driven through the Lua C
 * API (including its error paths, which must free what they built — run under ASan by
 * `make SANITIZE=1 test`), deadlines, and the fd guard. Prints TAP. */
#include "fc.h"
#include "tap.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int luaopen_fireclaw_json(lua_State *L);

/* Run `return <expr>` with json as a global; the string result, or the error text. */
static const char *eval(lua_State *L, const char *code, int *err)
{
	lua_settop(L, 0);
	if (luaL_loadstring(L, code) != 0) {
		*err = 1;
		return lua_tostring(L, -1);
	}
	*err = lua_pcall(L, 0, 1, 0) != 0;
	return lua_tostring(L, -1);
}

static void expect(lua_State *L, const char *code, const char *want, const char *name)
{
	int err;
	const char *got = eval(L, code, &err);
	ok(!err && got && strcmp(got, want) == 0, name);
	if (err || !got || strcmp(got, want) != 0)
		printf("#   got %s, want %s\n", got ? got : "(nil)", want);
}

static void expect_error(lua_State *L, const char *code, const char *part, const char *name)
{
	int err;
	const char *got = eval(L, code, &err);
	ok(err && got && strstr(got, part) != NULL, name);
	if (!err || !got || !strstr(got, part))
		printf("#   got %s, want an error containing %s\n", got ? got : "(nil)", part);
}

static void test_json(void)
{
	lua_State *L = luaL_newstate();
	luaL_openlibs(L);
	lua_pushcfunction(L, luaopen_fireclaw_json);
	lua_call(L, 0, 1);
	lua_setglobal(L, "json");
	expect(L, "return json.encode{a={1,2,3}}", "{\"a\":[1,2,3]}", "encode nested");
	expect(L, "return json.encode(json.decode('[1,{\"b\":[]}]'))", "[1,{\"b\":[]}]",
	       "round trip keeps empty arrays");
	expect(L, "return json.encode(json.decode('{\"x\":null}').x == json.null)", "true",
	       "null sentinel");
	/* errors raised half-way through an encode must free the partial tree (ASan) */
	expect_error(L, "return json.encode{a={b={c=print}}}", "cannot encode a function",
		     "error deep inside an encode");
	expect_error(L, "return json.encode{1,2,{x=0/0}}", "NaN", "error inside an array");
	expect_error(L, "return json.decode('[1,2')", "at byte", "decode error has an offset");
	for (int i = 0; i < 100; i++)
		eval(L, "return json.encode{a={b={c=print}}}", &(int){0});
	lua_gc(L, LUA_GCCOLLECT, 0);
	ok(1, "repeated failing encodes collected");
	lua_close(L);
}

static void test_deadlines(void)
{
	ok(fc_ms_left(-1) == -1, "no deadline means wait forever");
	ok(fc_ms_left(fc_now_ms() - 5) == 0, "a past deadline has 0 ms left");
	int left = fc_ms_left(fc_now_ms() + 1000);
	ok(left > 900 && left <= 1000, "a future deadline counts down");
}

static void test_fd_guard(void)
{
	lua_State *L = luaL_newstate();
	int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	fc_fd_guard(L, fd);
	lua_pop(L, 1);
	lua_gc(L, LUA_GCCOLLECT, 0);
	ok(fcntl(fd, F_GETFD) < 0, "a guard closes its fd when collected");
	fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	int *g = fc_fd_guard(L, fd);
	int back = fc_fd_release(g);
	lua_pop(L, 1);
	lua_gc(L, LUA_GCCOLLECT, 0);
	ok(back == fd && fcntl(fd, F_GETFD) >= 0, "a released guard leaves the fd open");
	close(fd);
	lua_close(L);
}

int main(void)
{
	test_json();
	test_deadlines();
	test_fd_guard();
	return tap_done();
}
