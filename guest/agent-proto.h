/* agent-proto.h - the wire protocol between fireclaw (core/agent.c) and its guest agent
 * (guest/fireclaw-agent.c), shared by both. docs/agent-protocol.md describes it in words.
 *
 * A byte stream (a virtio-serial port, a vsock connection, a socketpair in the tests)
 * carries frames: a 12-byte header, little-endian, then `len` bytes of payload.
 *
 *   u32 len      payload bytes, at most AGP_MAX_PAYLOAD
 *   u32 stream   0: the connection itself; else an operation the host started
 *   u8  type     AGP_T_*
 *   u8  flags    0
 *   u16 zero     0
 */
#ifndef AGENT_PROTO_H
#define AGENT_PROTO_H

#include <stdint.h>
#include <string.h>

#define AGP_VERSION 2
#define AGP_HDR 12
#define AGP_MAX_PAYLOAD (256u * 1024) /* any frame; an exec request is the biggest */
#define AGP_CHUNK 32768u	      /* data frames carry at most this */
#define AGP_WINDOW (256u * 1024)      /* stdin / put bytes in flight per stream */
#define AGP_MAX_STREAMS 64	      /* open streams per connection */
#define AGP_MAX_ARGS 4096	      /* argv entries, and env entries, per exec */
#define AGP_MIN_ENTROPY 32
#define AGP_MAX_ENTROPY 4096
#define AGP_MAX_MSG 1024 /* RESULT / ERROR text */
#define AGP_MAX_ENTRIES 100000 /* entries of one LIST */
#define AGP_ENTRY_FIXED 13
enum agp_kind { AGP_KIND_FILE = 1, AGP_KIND_DIR = 2, AGP_KIND_LINK = 3, AGP_KIND_OTHER = 4 };

/* the name prefix of the agent's virtio-serial ports; port K is PREFIX "K" */
#define AGP_PORT_PREFIX "org.fireclaw.agent."
#define AGP_VSOCK_PORT 1024
/* the console line the agent prints when started by its init shim (an imported image):
 * PREFIX " ports=N vsock=0|1", the channels it serves; the host reads it on a cold boot
 * (fireclaw.guest.AGENT_CHANNELS) rather than wait for an agent that cannot answer */
#define AGP_CHANNELS_LINE "fireclaw-agent: channels:"

enum agp_type {
	/* host -> guest */
	AGP_T_HELLO = 1,   /* stream 0: u32 version. Resets the connection's streams. */
	AGP_T_HANDOFF = 2, /* stream 0: u64 ns since 1970, then 32..4096 bytes of entropy */
	AGP_T_EXEC = 3,	   /* new stream: see below */
	AGP_T_STDIN = 4,   /* data for the stream's stdin; empty: EOF */
	AGP_T_SIGNAL = 5,  /* u32 signal number, to the stream's process group */
	AGP_T_RESIZE = 6,  /* u16 rows, u16 cols (a PTY stream) */
	AGP_T_PUT = 7,	   /* new stream: u32 mode, u64 size, path NUL, name NUL */
	AGP_T_DATA = 8,	   /* file bytes (put: host->guest; get: guest->host); empty: end */
	AGP_T_GET = 9,	   /* new stream: u64 max bytes, path NUL */
	AGP_T_CLOSE = 10,  /* abort the stream (kill its processes, drop its file) */
	AGP_T_PING = 11,   /* stream 0: up to 8 bytes, echoed in a PONG */
	AGP_T_MKDIR = 12,  /* new stream: u32 mode, path NUL; RESULT (an existing dir is fine) */
	AGP_T_LIST = 13,   /* new stream: path NUL; ENTRY frames, then RESULT */
	AGP_T_RESOLVER = 14, /* stream 0: an IPv4 address (text, no NUL): /etc/resolv.conf
			      * becomes "nameserver ADDR"; RESULT (version 2) */
	/* guest -> host */
	AGP_T_STDOUT = 32, /* data; empty: EOF */
	AGP_T_STDERR = 33,
	AGP_T_EXIT = 34,    /* i32 status (-1: killed), i32 signal (0: exited); the stream ends */
	AGP_T_WINDOW = 35,  /* u32 more bytes the host may send on the stream */
	AGP_T_RESULT = 36,  /* i32 errno (0: done), text; ends a put/get/handoff (stream 0) */
	AGP_T_FILE = 37,    /* get: u32 mode, u64 size; DATA frames follow, then RESULT */
	AGP_T_ERROR = 38,   /* stream 0: the agent refuses the connection's input (text) */
	AGP_T_PONG = 39,    /* stream 0: the PING's bytes */
	AGP_T_ENTRY = 41,   /* list: u8 kind (AGP_KIND_*), u32 mode, u64 size, the name */
	AGP_T_RESTART = 40, /* stream 0: u32 version, u32 pid: a port server that started
			     * anew (the agent was killed and restarted); whatever ran on the
			     * port is gone */
};

/* EXEC payload: u32 flags, u32 uid, u32 gid, u16 rows, u16 cols, u32 argc, u32 envc,
 * then argc strings, envc "K=V" strings and the cwd ("" for the user's home), each NUL
 * terminated, and nothing after. */
#define AGP_EXEC_FIXED 24
#define AGP_EXEC_PTY 1u
#define AGP_EXEC_SETUID 2u /* uid/gid apply; else root */

struct agp_hdr {
	uint32_t len, stream;
	uint8_t type, flags;
	uint16_t zero;
};

static inline uint32_t agp_u32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint16_t agp_u16(const unsigned char *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}
static inline uint64_t agp_u64(const unsigned char *p)
{
	return (uint64_t)agp_u32(p) | (uint64_t)agp_u32(p + 4) << 32;
}
static inline void agp_put32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)v, p[1] = (unsigned char)(v >> 8), p[2] = (unsigned char)(v >> 16),
	p[3] = (unsigned char)(v >> 24);
}
static inline void agp_put16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)v, p[1] = (unsigned char)(v >> 8);
}
static inline void agp_put64(unsigned char *p, uint64_t v)
{
	agp_put32(p, (uint32_t)v), agp_put32(p + 4, (uint32_t)(v >> 32));
}

/* Decode a header; 0, or -1 when it breaks a rule (size cap, nonzero reserved bits). */
static inline int agp_hdr_decode(const unsigned char *p, struct agp_hdr *h)
{
	h->len = agp_u32(p);
	h->stream = agp_u32(p + 4);
	h->type = p[8];
	h->flags = p[9];
	h->zero = agp_u16(p + 10);
	if (h->len > AGP_MAX_PAYLOAD || h->flags != 0 || h->zero != 0)
		return -1;
	return 0;
}

static inline void agp_hdr_encode(unsigned char *p, uint32_t len, uint32_t stream, uint8_t type)
{
	agp_put32(p, len);
	agp_put32(p + 4, stream);
	p[8] = type;
	p[9] = 0;
	agp_put16(p + 10, 0);
}

#endif
