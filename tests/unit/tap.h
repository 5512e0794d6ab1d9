/* tap.h - the C unit tests' TAP output: ok(cond, name) prints one "ok N - name" /
 * "not ok N - name" line; tap_done() prints the plan and is main's exit status. One
 * copy per test program (static): each test is a program of its own. */
#ifndef FC_UNIT_TAP_H
#define FC_UNIT_TAP_H

#include <stdio.h>

static int n, failed;

static void ok(int cond, const char *name)
{
	n++;
	if (!cond)
		failed++;
	printf("%s %d - %s\n", cond ? "ok" : "not ok", n, name);
}

static int tap_done(void)
{
	printf("1..%d\n", n);
	return failed != 0;
}

#endif
