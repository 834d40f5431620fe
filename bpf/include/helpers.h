#ifndef MESHACCEL_HELPERS_H
#define MESHACCEL_HELPERS_H

#include "maps.h"

#define MA_AF_INET 2
#define MA_AF_INET6 10

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = counters.lookup(&idx);

	if (v)
		*v += n; /* per-CPU slot: no atomics needed */
}

static __always_inline struct ma_config *config(void)
{
	__u32 zero = 0;

	return config_map.lookup(&zero);
}

/* IPv4 in network order -> IPv4-mapped IPv6 (::ffff:a.b.c.d), as the kernel itself
 * shows a v4 peer on an AF_INET6 socket. */
static __always_inline void ip4_to_mapped(__u32 ip4, __u32 out[4])
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = ip4;
}

static __always_inline int is_v4_mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

/* 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104 */
static __always_inline int is_loopback(const __u32 ip[4])
{
	if (is_v4_mapped(ip))
		return (bpf_ntohl(ip[3]) >> 24) == 127;
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

/* Is ip local to the pod in netns `cookie`? Every address of a registered pod is a key
 * of pod_config (its own and secondary interfaces' addresses); a prefix it accepts by a
 * local route is in pod_local_routes. */
static __always_inline int is_local_to_pod(__u64 cookie, const __u32 ip[4])
{
	struct pod_config *pod = pod_config.lookup((struct ip_key *)ip);
	struct local_route_key route = {.prefixlen = 64 + 128};

	if (pod && pod->netns_cookie == cookie)
		return 1;
	__builtin_memcpy(route.netns_cookie, &cookie, sizeof(cookie));
	__builtin_memcpy(route.ip, ip, sizeof(route.ip));
	return pod_local_routes.lookup(&route) != 0;
}

/* The inbound_listener key of a pod for a connection of this family: the listener is
 * filed under the pod's main address of that family (its first --ip of the family),
 * whichever of the pod's addresses the connection is for. */
static __always_inline struct ip_key *listener_key(struct pod_config *pod, __u8 family)
{
	return &pod->ips[family == 4 ? 0 : 1];
}

/* Loopback 4-tuples repeat in every pod, so their keys carry the netns cookie; a tuple
 * of two non-loopback (pod) addresses is unique on the node, and its two ends live in
 * two different netns (sidecar to sidecar): its key carries none, so each end can
 * compute the other's. */
static __always_inline void node_wide_if_pod_ips(struct sock_key *key)
{
	if (!is_loopback(key->local_ip) && !is_loopback(key->remote_ip))
		key->netns_cookie = 0;
}

/* One 32-bit load of a context field at a constant offset from the unmodified context
 * (or bpf_sock) pointer. Plain C lets clang merge `fam == 2 ? ctx->local_ip4 :
 * ctx->local_ip6[0]` into one load through a computed pointer, which the verifier
 * rejects ("dereference of modified ctx ptr"); `volatile` does not stop that. */
#define CTX_LOAD32(ptr, field)                                                        \
	({                                                                             \
		__u32 _v;                                                              \
		asm volatile("%0 = *(u32 *)(%1 + %2)"                                  \
			     : "=r"(_v)                                                \
			     : "r"(ptr), "i"(__builtin_offsetof(typeof(*(ptr)), field))); \
		_v;                                                                    \
	})

/* struct sock_key of the socket behind a sock_ops or sk_msg context: both name their
 * fields alike (remote_port in network order in the upper half, local_port host order). */
#define SOCK_KEY_FROM_CTX(key, ctx)                                                  \
	do {                                                                          \
		(key)->netns_cookie = bpf_get_netns_cookie(ctx);                      \
		if (CTX_LOAD32(ctx, family) == MA_AF_INET) {                          \
			ip4_to_mapped(CTX_LOAD32(ctx, local_ip4), (key)->local_ip);   \
			ip4_to_mapped(CTX_LOAD32(ctx, remote_ip4), (key)->remote_ip); \
		} else {                                                              \
			(key)->local_ip[0] = CTX_LOAD32(ctx, local_ip6[0]);           \
			(key)->local_ip[1] = CTX_LOAD32(ctx, local_ip6[1]);           \
			(key)->local_ip[2] = CTX_LOAD32(ctx, local_ip6[2]);           \
			(key)->local_ip[3] = CTX_LOAD32(ctx, local_ip6[3]);           \
			(key)->remote_ip[0] = CTX_LOAD32(ctx, remote_ip6[0]);         \
			(key)->remote_ip[1] = CTX_LOAD32(ctx, remote_ip6[1]);         \
			(key)->remote_ip[2] = CTX_LOAD32(ctx, remote_ip6[2]);         \
			(key)->remote_ip[3] = CTX_LOAD32(ctx, remote_ip6[3]);         \
		}                                                                     \
		(key)->local_port = CTX_LOAD32(ctx, local_port);                      \
		(key)->remote_port = bpf_ntohl(CTX_LOAD32(ctx, remote_port));         \
		node_wide_if_pod_ips(key);                                            \
	} while (0)

/* struct sock_key of a struct bpf_sock (getsockopt's and getpeername's ctx->sk), whose
 * fields say src/dst where sock_ops says local/remote; dst_port is network order. */
#define SOCK_KEY_FROM_SK(key, sk, ctx)                                               \
	do {                                                                          \
		(key)->netns_cookie = bpf_get_netns_cookie(ctx);                      \
		if (CTX_LOAD32(sk, family) == MA_AF_INET) {                           \
			ip4_to_mapped(CTX_LOAD32(sk, src_ip4), (key)->local_ip);      \
			ip4_to_mapped(CTX_LOAD32(sk, dst_ip4), (key)->remote_ip);     \
		} else {                                                              \
			(key)->local_ip[0] = CTX_LOAD32(sk, src_ip6[0]);              \
			(key)->local_ip[1] = CTX_LOAD32(sk, src_ip6[1]);              \
			(key)->local_ip[2] = CTX_LOAD32(sk, src_ip6[2]);              \
			(key)->local_ip[3] = CTX_LOAD32(sk, src_ip6[3]);              \
			(key)->remote_ip[0] = CTX_LOAD32(sk, dst_ip6[0]);             \
			(key)->remote_ip[1] = CTX_LOAD32(sk, dst_ip6[1]);             \
			(key)->remote_ip[2] = CTX_LOAD32(sk, dst_ip6[2]);             \
			(key)->remote_ip[3] = CTX_LOAD32(sk, dst_ip6[3]);             \
		}                                                                     \
		(key)->local_port = CTX_LOAD32(sk, src_port);                         \
		(key)->remote_port = bpf_ntohs((__u16)CTX_LOAD32(sk, dst_port));      \
		node_wide_if_pod_ips(key);                                            \
	} while (0)

/* The same connection seen from its other end (same netns). */
static __always_inline void peer_key(const struct sock_key *key, struct sock_key *peer)
{
	peer->netns_cookie = key->netns_cookie;
	__builtin_memcpy(peer->local_ip, key->remote_ip, sizeof(peer->local_ip));
	__builtin_memcpy(peer->remote_ip, key->local_ip, sizeof(peer->remote_ip));
	peer->local_port = key->remote_port;
	peer->remote_port = key->local_port;
}

static __always_inline int ip_eq(const __u32 a[4], const __u32 b[4])
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int in_cidr(const __u32 ip[4], const __u32 addr[4], const __u32 mask[4])
{
	return (ip[0] & mask[0]) == addr[0] && (ip[1] & mask[1]) == addr[1] &&
	       (ip[2] & mask[2]) == addr[2] && (ip[3] & mask[3]) == addr[3];
}

/* What a connect() looks like to the rules. */
struct conn {
	__u32 src[4];
	__u32 dst[4];
	__u32 uid;
	__u32 gid;
	__u16 dport;
	__u8 family; /* 4 or 6: which table's rules apply */
	__u8 local;  /* -o lo: destination is loopback or one of the pod's own addresses */
};

static __always_inline int rule_matches(const struct capture_rule *r, const struct conn *c)
{
	__u32 m = r->match;

	if (r->family != c->family || (m & RM_UDP))
		return 0;
	if ((m & RM_OUT_LO) && !c->local)
		return 0;
	if ((m & RM_SRC) && !in_cidr(c->src, r->addr, r->mask))
		return 0;
	if ((m & RM_DST) && in_cidr(c->dst, r->addr, r->mask) == !!(m & RM_NOT_DST))
		return 0;
	if ((m & RM_DPORT) && (c->dport == r->port) == !!(m & RM_NOT_DPORT))
		return 0;
	if ((m & RM_UID) && (c->uid == r->owner) == !!(m & RM_NOT_OWNER))
		return 0;
	if ((m & RM_GID) && (c->gid == r->owner) == !!(m & RM_NOT_OWNER))
		return 0;
	return 1;
}

/* The first of a pod's rules (ISTIO_OUTPUT or ISTIO_INBOUND) that matches, or NULL:
 * iptables' first-match-wins, over the same rules the iptables mode installs.
 *
 * Written so that Debian 12's 6.1 verifier can bound it. Left to itself, clang (loop
 * strength reduction) turns this loop into a countdown from min(n, MA_MAX_RULES) over a
 * pointer advanced by sizeof(struct capture_rule) each time. On 6.1 the verifier does not
 * learn from a failed `left == 0` that left >= 1, so the countdown has no bound, and it
 * walks the pointer past the end of pod_config ("invalid access to map value,
 * value_size=5232 off=5278 size=1"); 6.12 and 6.18 accept that form. The empty asm hides
 * i's value from clang, which then keeps the index as written: i counts up from 0, each
 * rule is addressed as rules[i] and both exits are tested on i, which every verifier
 * tracks as a known constant on each iteration. The asm emits no instruction. */
static __always_inline const struct capture_rule *
first_match(const struct capture_rule *rules, __u16 n, const struct conn *c)
{
	for (__u32 i = 0; i < MA_MAX_RULES; i++) {
		asm volatile("" : "+r"(i));
		if (i >= n)
			break;
		if (rule_matches(&rules[i], c))
			return &rules[i];
	}
	return 0;
}

#endif /* MESHACCEL_HELPERS_H */
