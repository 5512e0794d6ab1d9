/* json.c - fireclaw.json on json-c.
 *
 *   json.encode(value [, {pretty = true}]) -> string
 *   json.decode(string) -> value          (raises "json: … at byte N")
 *   json.null                             sentinel for JSON null
 *   json.array([t]) -> t                  mark a table as an array ([] when empty)
 *   json.is_array(t) -> boolean
 *   json.utf8(s) -> true | false, copy   is s valid UTF-8? if not, a copy with U+FFFD
 *                                         for every byte that is not part of valid UTF-8
 *   json.base64(s) -> string              (RFC 4648, padded)
 *
 * Objects become tables, arrays become sequences marked as arrays (so `[]` survives a
 * round trip); an unmarked empty table encodes as {}. Object keys are written sorted, so
 * output is stable. Integers up to 2^53 stay integers; strings are bytes (UTF-8 passes
 * through untouched, NUL bytes included). Object keys are C strings in json-c: a key with
 * \u0000 is cut there. NaN, Infinity and numbers beyond a double's range are refused.
 * Bytes that are not UTF-8 are written as they are, which makes JSON that strict parsers
 * refuse: json.utf8 and json.base64 let a caller carry such data as text + exact bytes.
 */
#include "fc.h"

#include <json.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ARRAY_MT "fireclaw.json.array"
#define BOX_MT "fireclaw.json.box"
#define NULL_KEY "fireclaw.json.null"
#define MAX_DEPTH 512
#define MAX_SAFE_INT 9007199254740992.0 /* 2^53 */

/* Owns a json-c tree while it is built or read, so a Lua error (out of memory, a value
 * that cannot be encoded) halfway through frees it through __gc. */
struct box {
	json_object *root;
};

static int box_close(lua_State *L)
{
	struct box *b = luaL_checkudata(L, 1, BOX_MT);
	if (b->root)
		json_object_put(b->root);
	b->root = NULL;
	return 0;
}

static struct box *new_box(lua_State *L)
{
	return fc_new(L, sizeof(struct box), BOX_MT);
}

static void push_null(lua_State *L)
{
	lua_getfield(L, LUA_REGISTRYINDEX, NULL_KEY);
}

static int is_null(lua_State *L, int idx)
{
	push_null(L);
	int r = lua_rawequal(L, idx < 0 ? idx - 1 : idx, -1);
	lua_pop(L, 1);
	return r;
}

/* ---- encode ---- */

static json_object *encode_value(lua_State *L, int idx, int depth);

static json_object *encode_number(lua_State *L, double d)
{
	if (!isfinite(d))
		fc_error(L, "json: cannot encode %s", isnan(d) ? "NaN" : "infinity");
	if (d == floor(d) && fabs(d) <= MAX_SAFE_INT)
		return json_object_new_int64((int64_t)d);
	/* shortest representation that reads back as the same double */
	char buf[32];
	snprintf(buf, sizeof buf, "%.15g", d);
	if (strtod(buf, NULL) != d)
		snprintf(buf, sizeof buf, "%.17g", d);
	return json_object_new_double_s(d, buf);
}

/* Length n if the table is a sequence 1..n with no other keys, 0 if empty, -1 otherwise. */
static long sequence_length(lua_State *L, int idx)
{
	long n = 0, max = 0;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		lua_pop(L, 1);
		if (lua_type(L, -1) != LUA_TNUMBER) {
			lua_pop(L, 1);
			return -1;
		}
		double k = lua_tonumber(L, -1);
		if (k < 1 || k != floor(k)) {
			lua_pop(L, 1);
			return -1;
		}
		n++;
		if (k > max)
			max = (long)k;
	}
	return n == max ? n : -1;
}

static int has_array_mark(lua_State *L, int idx)
{
	if (!lua_getmetatable(L, idx))
		return 0;
	luaL_getmetatable(L, ARRAY_MT);
	int r = lua_rawequal(L, -1, -2);
	lua_pop(L, 2);
	return r;
}

static json_object *encode_array(lua_State *L, int idx, long n, int depth, json_object *arr)
{
	for (long i = 1; i <= n; i++) {
		lua_rawgeti(L, idx, (int)i);
		json_object_array_add(arr, encode_value(L, lua_gettop(L), depth + 1));
		lua_pop(L, 1);
	}
	return arr;
}

static json_object *encode_object(lua_State *L, int idx, int depth, json_object *obj)
{
	size_t n = 0;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		lua_pop(L, 1);
		if (lua_type(L, -1) != LUA_TSTRING)
			fc_error(L, "json: cannot encode a table with mixed or non-string keys "
				    "(key %s)",
				 luaL_typename(L, -1));
		n++;
	}
	/* keys are anchored by the table itself while we hold their pointers */
	const char **keys = lua_newuserdata(L, (n ? n : 1) * sizeof *keys);
	size_t i = 0;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		lua_pop(L, 1);
		keys[i++] = lua_tostring(L, -1);
	}
	fc_sort_strings(keys, (size_t)n);
	for (i = 0; i < n; i++) {
		lua_getfield(L, idx, keys[i]);
		json_object *v = encode_value(L, lua_gettop(L), depth + 1);
		json_object_object_add(obj, keys[i], v);
		lua_pop(L, 1);
	}
	lua_pop(L, 1); /* keys */
	return obj;
}

/* Encode the value at idx. Every child is attached to its parent as soon as it exists,
 * so the caller's box owns the whole tree if an error is raised part-way. */
static json_object *encode_value(lua_State *L, int idx, int depth)
{
	if (depth > MAX_DEPTH)
		fc_error(L, "json: cannot encode: nested more than %d deep (a cycle?)",
			 MAX_DEPTH);
	switch (lua_type(L, idx)) {
	case LUA_TNIL:
		return NULL;
	case LUA_TBOOLEAN:
		return json_object_new_boolean(lua_toboolean(L, idx));
	case LUA_TNUMBER:
		return encode_number(L, lua_tonumber(L, idx));
	case LUA_TSTRING: {
		size_t len;
		const char *s = lua_tolstring(L, idx, &len);
		return json_object_new_string_len(s, (int)len);
	}
	case LUA_TTABLE: {
		long n = has_array_mark(L, idx) ? (long)lua_objlen(L, idx) : sequence_length(L, idx);
		json_object *c = n > 0 || has_array_mark(L, idx) ? json_object_new_array_ext((int)n)
								  : json_object_new_object();
		/* a box owns the container while we recurse: an error frees it */
		struct box *b = new_box(L);
		b->root = c;
		if (json_object_is_type(c, json_type_array))
			encode_array(L, idx, n, depth, c);
		else
			encode_object(L, idx, depth, c);
		b->root = NULL;
		lua_pop(L, 1);
		return c;
	}
	default:
		if (is_null(L, idx))
			return NULL;
		fc_error(L, "json: cannot encode a %s", luaL_typename(L, idx));
	}
}

static int l_encode(lua_State *L)
{
	luaL_checkany(L, 1);
	static const char *const known[] = {"pretty", NULL};
	fc_opt_check(L, 2, "json.encode", known);
	int flags = JSON_C_TO_STRING_NOSLASHESCAPE;
	flags |= fc_opt_bool(L, 2, "pretty", 0) ? JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED
						: JSON_C_TO_STRING_PLAIN;
	struct box *b = new_box(L);
	b->root = encode_value(L, 1, 0);
	if (!b->root) {
		lua_pushliteral(L, "null");
		return 1;
	}
	size_t len;
	const char *s = json_object_to_json_string_length(b->root, flags, &len);
	lua_pushlstring(L, s, len);
	json_object_put(b->root); /* free now rather than at the next GC cycle */
	b->root = NULL;
	return 1;
}

/* ---- decode ---- */

static void push_value(lua_State *L, json_object *o, int depth)
{
	luaL_checkstack(L, 4, "json: nested too deep");
	switch (json_object_get_type(o)) {
	case json_type_null:
		push_null(L);
		break;
	case json_type_boolean:
		lua_pushboolean(L, json_object_get_boolean(o));
		break;
	case json_type_int:
		lua_pushnumber(L, (lua_Number)json_object_get_int64(o));
		break;
	case json_type_double: {
		/* json-c also reads NaN, Infinity and 1e400 (as inf): not JSON, and encode
		 * refuses them, so decode does too */
		double d = json_object_get_double(o);
		if (!isfinite(d))
			fc_error(L, "json: not a finite number: %s", json_object_get_string(o));
		lua_pushnumber(L, d);
		break;
	}
	case json_type_string:
		lua_pushlstring(L, json_object_get_string(o), (size_t)json_object_get_string_len(o));
		break;
	case json_type_array: {
		size_t n = json_object_array_length(o);
		lua_createtable(L, (int)n, 0);
		for (size_t i = 0; i < n; i++) {
			push_value(L, json_object_array_get_idx(o, i), depth + 1);
			lua_rawseti(L, -2, (int)i + 1);
		}
		luaL_getmetatable(L, ARRAY_MT);
		lua_setmetatable(L, -2);
		break;
	}
	case json_type_object: {
		lua_createtable(L, 0, json_object_object_length(o));
		json_object_object_foreach(o, key, val)
		{
			push_value(L, val, depth + 1);
			lua_setfield(L, -2, key);
		}
		break;
	}
	}
}

static int l_decode(lua_State *L)
{
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);
	json_tokener *tok = json_tokener_new_ex(MAX_DEPTH);
	if (!tok)
		fc_error(L, "json: out of memory");
	/* include the terminating NUL: it tells json-c a trailing number is complete */
	json_object *o = json_tokener_parse_ex(tok, s, (int)len + 1);
	enum json_tokener_error err = json_tokener_get_error(tok);
	size_t offset = json_tokener_get_parse_end(tok);
	json_tokener_free(tok);
	if (err == json_tokener_continue)
		fc_error(L, "json: unexpected end of input at byte %d", (int)len);
	if (err != json_tokener_success)
		fc_error(L, "json: %s at byte %d", json_tokener_error_desc(err), (int)offset);
	struct box *b = new_box(L);
	b->root = o;
	/* only white space may follow the value */
	for (size_t i = offset; i < len; i++)
		if (!strchr(" \t\r\n", s[i]))
			fc_error(L, "json: unexpected data after the value at byte %d", (int)i);
	push_value(L, o, 0);
	lua_replace(L, -2);
	json_object_put(o);
	b->root = NULL;
	return 1;
}

/* ---- helpers ---- */

static int l_array(lua_State *L)
{
	if (lua_isnoneornil(L, 1))
		lua_newtable(L);
	luaL_checktype(L, 1, LUA_TTABLE);
	lua_settop(L, 1);
	luaL_getmetatable(L, ARRAY_MT);
	lua_setmetatable(L, 1);
	return 1;
}

static int l_is_array(lua_State *L)
{
	lua_pushboolean(L, lua_istable(L, 1) && has_array_mark(L, 1));
	return 1;
}

/* ---- text JSON can carry ---- */

/* Length of the valid UTF-8 sequence starting s[0] (n bytes left), or 0: RFC 3629, so no
 * overlong forms, no surrogates, nothing above U+10FFFF. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	unsigned c = s[0], lo = 0x80, hi = 0xBF;
	size_t len;
	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		len = 2;
	else if (c >= 0xE0 && c <= 0xEF)
		len = 3, lo = c == 0xE0 ? 0xA0 : lo, hi = c == 0xED ? 0x9F : hi;
	else if (c >= 0xF0 && c <= 0xF4)
		len = 4, lo = c == 0xF0 ? 0x90 : lo, hi = c == 0xF4 ? 0x8F : hi;
	else
		return 0;
	if (n < len || s[1] < lo || s[1] > hi)
		return 0;
	for (size_t i = 2; i < len; i++)
		if (s[i] < 0x80 || s[i] > 0xBF)
			return 0;
	return len;
}

static int l_utf8(lua_State *L)
{
	size_t n, i = 0, len;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
	while (i < n && (len = utf8_seq(s + i, n - i)) > 0)
		i += len;
	lua_pushboolean(L, i == n);
	if (i == n)
		return 1;
	luaL_Buffer b;
	luaL_buffinit(L, &b);
	luaL_addlstring(&b, (const char *)s, i);
	while (i < n) {
		len = utf8_seq(s + i, n - i);
		if (len > 0)
			luaL_addlstring(&b, (const char *)s + i, len);
		else
			luaL_addlstring(&b, "\xEF\xBF\xBD", 3); /* U+FFFD */
		i += len > 0 ? len : 1;
	}
	luaL_pushresult(&b);
	return 2;
}

static int l_base64(lua_State *L)
{
	size_t n;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
	/* GC-owned buffer (4 output bytes per 3 input bytes, + the NUL the encoder adds) */
	char *buf = lua_newuserdata(L, 4 * ((n + 2) / 3) + 1);
	size_t out = fc_base64_encode(buf, s, n);
	lua_pushlstring(L, buf, out);
	return 1;
}

static int null_tostring(lua_State *L)
{
	lua_pushliteral(L, "json.null");
	return 1;
}

int luaopen_fireclaw_json(lua_State *L)
{
	static const luaL_Reg box_methods[] = {{"close", box_close}, {NULL, NULL}};
	static const luaL_Reg fns[] = {
		{"encode", l_encode},
		{"decode", l_decode},
		{"array", l_array},
		{"is_array", l_is_array},
		{"utf8", l_utf8},
		{"base64", l_base64},
		{NULL, NULL},
	};
	fc_class(L, BOX_MT, box_methods);
	luaL_newmetatable(L, ARRAY_MT);
	lua_pop(L, 1);

	lua_getfield(L, LUA_REGISTRYINDEX, NULL_KEY);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		lua_newuserdata(L, 0);
		lua_createtable(L, 0, 1);
		lua_pushcfunction(L, null_tostring);
		lua_setfield(L, -2, "__tostring");
		lua_setmetatable(L, -2);
		lua_pushvalue(L, -1);
		lua_setfield(L, LUA_REGISTRYINDEX, NULL_KEY);
	}
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	lua_insert(L, -2);
	lua_setfield(L, -2, "null");
	return 1;
}
