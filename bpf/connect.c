/* cgroup/connect4 and cgroup/connect6: decide, as istio-iptables' ISTIO_OUTPUT chain
 * would, whether a TCP connect() from a meshed pod goes to its sidecar; if so rewrite it
 * to the sidecar on loopback (outbound port, or inbound port for the sidecar calling its
 * own pod) and remember the original destination. Replaces `-j REDIRECT --to-ports`. */
#include "helpers.h"

#define MA_IPPROTO_TCP 6

/* decide()'s RETURNs that are still sidecar hops worth the shortcut */
#define RA_SIDECAR_OWN 0    /* the sidecar itself is connecting */
#define RA_PASSTHROUGH 0x10 /* the sidecar's inbound passthrough (from 127.0.0.6) to the app */

/* Walk the pod's ISTIO_OUTPUT rules; count why a connection is left alone. */
static __always_inline __u32 decide(const struct pod_config *pod, const struct conn *c)
{
	const struct capture_rule *r = first_match(pod->output, pod->n_output, c);

	if (r && r->action != RA_RETURN)
		return r->action;
	if (r && (r->match & (RM_UID | RM_GID)) && !(r->match & RM_NOT_OWNER)) {
		count(CNT_CONNECT_SKIPPED_PROXY_UID, 1);
		return RA_SIDECAR_OWN;
	}
	count(c->local ? CNT_CONNECT_SKIPPED_LOCAL : CNT_CONNECT_SKIPPED_RULE, 1);
	return (r && (r->match & RM_SRC)) ? RA_PASSTHROUGH : RA_RETURN;
}

/* Remember a connection's destination without rewriting it: sockops then puts both of
 * its sockets in sock_hash as for a captured one, so sk_msg shortcuts this hop too. */
static __always_inline void remember(struct bpf_sock_addr *ctx, const struct conn *c, __u16 family,
				     __u32 counter)
{
	struct orig_dst od = {};
	__u64 cookie = bpf_get_socket_cookie(ctx);

	__builtin_memcpy(od.ip, c->dst, sizeof(od.ip));
	od.port = c->dport;
	od.family = family;
	orig_dst_by_cookie.update(&cookie, &od);
	count(counter, 1);
}

/* Is the sidecar connecting to a captured port of another registered pod on this node
 * (that sk_lookup, or that pod's own REDIRECT to its inbound port, will hand to that pod's
 * sidecar)? The destination is left as it is: sockops pairs both ends either way. */
static __always_inline int to_local_pod_sidecar(const struct conn *c)
{
	struct pod_config *dst_pod = pod_config.lookup((struct ip_key *)c->dst);
	const struct capture_rule *r;

	if (!dst_pod)
		return 0;
	r = first_match(dst_pod->inbound, dst_pod->n_inbound, c);
	return r && r->action == RA_IN_REDIRECT;
}

/* Returns the sidecar port to rewrite the connect() to, or 0 to leave it alone. The
 * caller rewrites: a connect4 program may only write user_ip4, connect6 only user_ip6.
 * When in doubt we don't capture (we never refuse a connect()). */
static __always_inline __u16 capture(struct bpf_sock_addr *ctx, struct conn *c, __u16 family)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	__u64 uid_gid = bpf_get_current_uid_gid();
	struct ip_key *pod_ip;
	struct pod_config *pod;
	struct orig_dst od = {};
	__u32 action;
	__u16 port;

	if (ctx->protocol != MA_IPPROTO_TCP) {
		count(CNT_CONNECT_SKIPPED_NOT_TCP, 1);
		return 0;
	}
	pod_ip = pod_by_netns.lookup(&cookie);
	pod = pod_ip ? pod_config.lookup(pod_ip) : 0;
	if (!pod) {
		count(CNT_CONNECT_SKIPPED_NO_POD, 1);
		return 0;
	}
	c->uid = uid_gid & 0xffffffff;
	c->gid = uid_gid >> 32;
	c->local = is_loopback(c->dst) || is_local_to_pod(cookie, c->dst);
	action = decide(pod, c);
	if (action == RA_SIDECAR_OWN && !c->local && to_local_pod_sidecar(c))
		remember(ctx, c, family, CNT_CONNECT_SIDECAR_TO_POD);
	if (action == RA_PASSTHROUGH && !is_loopback(c->dst))
		remember(ctx, c, family, CNT_CONNECT_PASSTHROUGH);
	if (action == RA_REDIRECT)
		port = pod->proxy_port;
	else if (action == RA_IN_REDIRECT)
		port = pod->inbound_port;
	else
		return 0;

	__builtin_memcpy(od.ip, c->dst, sizeof(od.ip));
	od.port = c->dport;
	od.family = family;
	od.flags = OD_REWRITTEN;
	cookie = bpf_get_socket_cookie(ctx);
	long err = orig_dst_by_cookie.update(&cookie, &od);

	if (err) {
		count(CNT_CONNECT_RECORD_FAILED, 1);
		return 0; /* without the original destination the sidecar could not route it */
	}
	count(action == RA_REDIRECT ? CNT_CONNECT_CAPTURED : CNT_CONNECT_CAPTURED_INBOUND, 1);
	return port;
}

/* The socket's bound source address, if any (Envoy's passthrough binds 127.0.0.6). */
static __always_inline void bound_src(struct bpf_sock_addr *ctx, struct conn *c)
{
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return;
	if (CTX_LOAD32(sk, family) == MA_AF_INET) {
		ip4_to_mapped(CTX_LOAD32(sk, src_ip4), c->src);
	} else {
		c->src[0] = CTX_LOAD32(sk, src_ip6[0]);
		c->src[1] = CTX_LOAD32(sk, src_ip6[1]);
		c->src[2] = CTX_LOAD32(sk, src_ip6[2]);
		c->src[3] = CTX_LOAD32(sk, src_ip6[3]);
	}
}

int ma_connect4(struct bpf_sock_addr *ctx)
{
	struct conn c = {};
	__u16 proxy_port;

	ip4_to_mapped(ctx->user_ip4, c.dst);
	c.dport = bpf_ntohs(ctx->user_port);
	c.family = 4;
	bound_src(ctx, &c);
	proxy_port = capture(ctx, &c, MA_AF_INET);
	if (proxy_port) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(proxy_port);
	}
	return 1;
}

int ma_connect6(struct bpf_sock_addr *ctx)
{
	struct conn c = {};
	__u16 proxy_port;
	int v4_mapped;

	c.dst[0] = ctx->user_ip6[0];
	c.dst[1] = ctx->user_ip6[1];
	c.dst[2] = ctx->user_ip6[2];
	c.dst[3] = ctx->user_ip6[3];
	c.dport = bpf_ntohs(ctx->user_port);
	v4_mapped = is_v4_mapped(c.dst);
	c.family = v4_mapped ? 4 : 6; /* a v4-mapped destination is IPv4 on the wire */
	bound_src(ctx, &c);
	proxy_port = capture(ctx, &c, v4_mapped ? MA_AF_INET : MA_AF_INET6);
	if (proxy_port) {
		/* a v4-mapped destination stays in v4 space: ::ffff:127.0.0.1, else ::1 */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = v4_mapped ? bpf_htonl(0x0000ffff) : 0;
		ctx->user_ip6[3] = v4_mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(proxy_port);
	}
	return 1;
}
