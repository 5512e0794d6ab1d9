/* C unit tests for core/fc_base64.c: RFC 4648's vectors, round trips of every length mod 3
 * (all byte values), and the strict decoder's refusals (padding in the wrong place,
 * non-zero unused bits, characters outside the alphabet, lengths, the output cap). Prints
 * TAP. */
#include "fc.h"
#include "tap.h"

#include <stdio.h>
#include <string.h>

static void vector(const char *plain, const char *coded)
{
	char out[64], name[96];
	size_t len = fc_base64_encode(out, (const unsigned char *)plain, strlen(plain));
	snprintf(name, sizeof name, "encode \"%s\" is \"%s\"", plain, coded);
	ok(len == strlen(coded) && strcmp(out, coded) == 0, name);
	if (strcmp(out, coded) != 0)
		printf("#   got \"%s\"\n", out);
	unsigned char back[64];
	long got = fc_base64_decode(back, sizeof back, coded, strlen(coded));
	snprintf(name, sizeof name, "decode \"%s\" is \"%s\"", coded, plain);
	ok(got == (long)strlen(plain) && memcmp(back, plain, (size_t)got) == 0, name);
}

static void refused(const char *coded, const char *why)
{
	unsigned char back[64];
	char name[128];
	snprintf(name, sizeof name, "decode refuses \"%s\" (%s)", coded, why);
	for (char *c = name; *c; c++) /* TAP names are one line */
		if ((unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f)
			*c = '?';
	ok(fc_base64_decode(back, sizeof back, coded, strlen(coded)) == -1, name);
}

/* Every length 0..300 (so every length mod 3, and groups across the 256 byte values):
 * the encoding has the right length and padding, and decodes to the same bytes. */
static void round_trips(void)
{
	unsigned char in[300], back[300];
	char out[4 * 100 + 1];
	for (size_t i = 0; i < sizeof in; i++)
		in[i] = (unsigned char)(i * 37 + 11);
	int good = 1;
	for (size_t len = 0; len <= sizeof in && good; len++) {
		size_t el = fc_base64_encode(out, in, len);
		size_t pad = len % 3 ? 3 - len % 3 : 0;
		good = el == 4 * ((len + 2) / 3) && out[el] == 0 &&
		       strspn(out + el - pad, "=") == pad &&
		       strchr(out, '=') == (pad ? out + el - pad : NULL);
		long got = fc_base64_decode(back, sizeof back, out, el);
		good = good && got == (long)len && memcmp(back, in, len) == 0;
		if (!good)
			printf("#   length %zu: \"%s\"\n", len, out);
	}
	ok(good, "lengths 0..300 (all mod 3): length, padding, round trip");
	unsigned char all[256];
	for (int i = 0; i < 256; i++)
		all[i] = (unsigned char)i;
	char enc[4 * 86 + 1];
	size_t el = fc_base64_encode(enc, all, sizeof all);
	long got = fc_base64_decode(back, sizeof back, enc, el);
	ok(got == 256 && memcmp(back, all, 256) == 0, "every byte value round trips");
}

int main(void)
{
	/* RFC 4648, section 10 */
	vector("", "");
	vector("f", "Zg==");
	vector("fo", "Zm8=");
	vector("foo", "Zm9v");
	vector("foob", "Zm9vYg==");
	vector("fooba", "Zm9vYmE=");
	vector("foobar", "Zm9vYmFy");
	vector("\xff\xfe\xfd", "//79");
	vector("\xfb\xef\xbe", "++++");
	round_trips();

	refused("Zg=", "length not a multiple of 4");
	refused("Zg", "unpadded");
	refused("Zm9vY", "length not a multiple of 4");
	refused("Zh==", "unused bits set");
	refused("Zm9=", "unused bits set");
	refused("Z===", "three padding characters");
	refused("====", "padding only");
	refused("=Zg=", "padding first");
	refused("Zg=a", "padding inside a group");
	refused("Zg==Zg==", "padding before the last group");
	refused("Zm9v\n", "a newline");
	refused("Zm 9", "a space");
	refused("Zm-_", "the URL-safe alphabet");
	refused("Zm9\xc3", "a non-ASCII byte");
	unsigned char back[8];
	ok(fc_base64_decode(back, sizeof back, "Zm\0v", 4) == -1, "decode refuses a NUL");
	ok(fc_base64_decode(back, 2, "Zm9v", 4) == -1, "decode refuses what does not fit");
	ok(fc_base64_decode(back, 3, "Zm9v", 4) == 3, "decode fills the buffer exactly");
	ok(fc_base64_decode(back, 1, "Zg==", 4) == 1, "a padded group needs only its bytes");

	return tap_done();
}
