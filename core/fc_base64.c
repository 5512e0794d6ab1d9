/* fc_base64.c - base64 (RFC 4648, standard alphabet, padded) for json.base64 and the SSH
 * host key lines of core/ssh.c.
 *
 * Not OpenSSL's EVP_EncodeBlock/EVP_DecodeBlock: linking libcrypto for these cost every
 * start of fireclaw its loading and relocation (~0.5 ms), and EVP_DecodeBlock is lenient
 * (it takes '=' anywhere as a zero digit and counts padding as data bytes). The decoder
 * here accepts exactly what a canonical encoder writes.
 */
#include "fc.h"

static const char ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t fc_base64_encode(char *out, const unsigned char *in, size_t n)
{
	size_t o = 0, i = 0;
	for (; n - i >= 3; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
		out[o++] = ALPHABET[v >> 18];
		out[o++] = ALPHABET[v >> 12 & 63];
		out[o++] = ALPHABET[v >> 6 & 63];
		out[o++] = ALPHABET[v & 63];
	}
	if (n - i > 0) {
		uint32_t v = (uint32_t)in[i] << 16 | (n - i == 2 ? (uint32_t)in[i + 1] << 8 : 0);
		out[o++] = ALPHABET[v >> 18];
		out[o++] = ALPHABET[v >> 12 & 63];
		out[o++] = n - i == 2 ? ALPHABET[v >> 6 & 63] : '=';
		out[o++] = '=';
	}
	out[o] = 0;
	return o;
}

/* The value of one base64 digit, or -1. */
static int digit(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

long fc_base64_decode(unsigned char *out, size_t cap, const char *in, size_t n)
{
	if (n % 4 != 0)
		return -1;
	size_t o = 0;
	for (size_t i = 0; i < n; i += 4) {
		int last = i + 4 == n;
		/* padding: only in the last group, as "xx==" or "xxx=" */
		int pad = last && in[i + 3] == '=' ? (in[i + 2] == '=' ? 2 : 1) : 0;
		uint32_t v = 0;
		for (int k = 0; k < 4; k++) {
			int d = k < 4 - pad ? digit((unsigned char)in[i + k]) : 0;
			if (d < 0)
				return -1;
			v = v << 6 | (uint32_t)d;
		}
		size_t bytes = 3 - (size_t)pad;
		/* the bits a padded group does not carry must be zero (one encoding per value) */
		if ((pad == 1 && (v & 0xFF)) || (pad == 2 && (v & 0xFFFF)))
			return -1;
		if (cap - o < bytes)
			return -1;
		out[o++] = (unsigned char)(v >> 16);
		if (bytes > 1)
			out[o++] = (unsigned char)(v >> 8);
		if (bytes > 2)
			out[o++] = (unsigned char)v;
	}
	return (long)o;
}
