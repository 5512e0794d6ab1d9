-- fireclaw.json: round trips, edge cases, malformed input.
local t = require "tap"
local json = require "fireclaw.json"

t.is(json.encode { a = { 1, 2, 3 } }, '{"a":[1,2,3]}', "object with array")
t.is(json.encode {}, "{}", "empty table is an object")
t.is(json.encode(json.array()), "[]", "marked empty table is an array")
t.is(json.encode(json.null), "null", "null sentinel encodes")
t.is(json.encode(nil), "null", "nil encodes as null")
t.is(json.encode { b = 1, a = 2, c = 3 }, '{"a":2,"b":1,"c":3}', "keys sorted: stable output")
t.is(json.encode(2 ^ 53), "9007199254740992", "2^53 stays an integer")
t.is(json.encode(-42), "-42", "negative integer")
t.is(json.encode(0.1), "0.1", "shortest double")
t.is(json.encode(1 / 3), "0.33333333333333331", "double that needs 17 digits")
t.is(json.encode(1e300), "1e+300", "large double")
t.is(json.encode("a/b"), '"a/b"', "slash not escaped")
t.is(json.encode("é€😀"), '"é€😀"', "UTF-8 passes through")
t.is(json.encode("a\0b\n\"\\"), '"a\\u0000b\\n\\"\\\\"', "control characters escaped, NUL kept")
t.is(json.encode { x = true, y = false }, '{"x":true,"y":false}', "booleans")
t.like(json.encode({ a = { b = 1 } }, { pretty = true }), '\n  "a": {', "pretty printing")

-- decode
local v = json.decode('{"a":[1,2,{"b":null}],"e":[],"o":{},"s":"h\\u00e9\\u0000x","n":-1.5e3}')
t.is(v.a[1], 1, "array element")
t.is(v.a[3].b, json.null, "null decodes to the sentinel")
t.ok(json.is_array(v.e) and #v.e == 0, "empty array decodes as a marked array")
t.ok(not json.is_array(v.o), "empty object decodes as a plain table")
t.is(v.s, "hé\0x", "unicode escapes and NUL decoded")
t.is(v.n, -1500, "exponent")
t.is(json.encode(v.e), "[]", "[] round trips")
t.is(json.encode(v.o), "{}", "{} round trips")
t.is(json.decode("9007199254740993") - 9007199254740992 <= 1, true, "big integer decodes approximately")
t.is(json.decode("  42  "), 42, "surrounding white space")
t.is(json.decode('"x"'), "x", "scalar document")

-- round trips
local cases = {
	'{"a":[1,2,3]}', "[]", "{}", '[[],{},[{}]]', '{"k":null}', '"\\u0001"', "[true,false,null]",
	'{"nested":{"deeper":{"deepest":[1,[2,[3]]]}}}', "1.5", '"tab\\tquote\\""',
}
for _, c in ipairs(cases) do
	t.is(json.encode(json.decode(c)), c, "round trip " .. c)
end

-- malformed input
t.raises(function() json.decode('{"a": tru}') end, "^json: .* at byte %d+", "bad literal names a byte offset")
t.raises(function() json.decode('{"a": 1') end, "unexpected end of %a+ at byte 7", "truncated")
t.raises(function() json.decode('{"a": 1} x') end, "unexpected data after the value at byte 9", "trailing garbage")
t.raises(function() json.decode("") end, "^json:", "empty input")
t.raises(function() json.decode(string.rep("[", 10000)) end, "^json:", "too deep")
t.raises(function() json.encode { 1, nil, 3, x = 1 } end, "mixed", "mixed keys refused")
t.raises(function() json.encode(0 / 0) end, "NaN", "NaN refused")
t.raises(function() json.encode(math.huge) end, "infinity", "inf refused")
t.raises(function() json.encode(print) end, "cannot encode a function", "function refused")
local cyc = {}
cyc.self = cyc
t.raises(function() json.encode(cyc) end, "cycle", "cycle refused")

-- a large document
local big = {}
for i = 1, 10000 do big[i] = { id = i, name = "item" .. i } end
local s = json.encode(big)
t.is(#json.decode(s), 10000, "10000-element round trip")
return t.done()
